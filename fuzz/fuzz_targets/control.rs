//! Fuzzes the control socket's parsers: a request line as the VMM parses it
//! (`vmm::api::parse_request`, then `migration::Plan::parse` for a `migrate`), and a reply
//! line as the client (`vmm ctl`, `api::client::request`) parses it.
//!
//! Asserts: no panic; a parsed request serialises to JSON that parses back to an equal
//! request, and so does a parsed reply (floats up to an ulp, see `same`); `Plan::parse` always yields at least one pass and
//! refuses exactly the unknown modes; peak allocation linear in the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use fuzz::peak_during;
use serde_json::Value;
use vmm::api::{parse_request, replies, Reply, Request};
use vmm::migration::Plan;

/// JSON values equal, floats up to their last bit or two: serde_json (without its
/// `float_roundtrip` feature) may parse a decimal one ulp off the correctly rounded value, so
/// a float printed and parsed back can move by an ulp. Everything else must be equal.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((k, x), (l, y))| k == l && same(x, y))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let ((), peak) = peak_during(|| {
        if let Ok(req) = parse_request(data) {
            let line = serde_json::to_vec(&req).expect("a parsed request serialises");
            let back = parse_request(&line).expect("a serialised request parses");
            assert_eq!(back, req);
            if let Request::Migrate {
                mode,
                max_passes,
                threshold_pages,
                max_downtime_ms,
                verify,
                ..
            } = &req
            {
                let plan = Plan::parse(
                    mode.as_deref(),
                    *max_passes,
                    *threshold_pages,
                    *max_downtime_ms,
                    *verify,
                );
                assert!(plan.max_passes >= 1);
                let known = matches!(
                    mode.as_deref(),
                    None | Some("postcopy" | "hybrid" | "precopy")
                );
                assert_eq!(plan.mode.is_ok(), known);
            }
        }
        // the client reads reply lines as text
        if let Ok(text) = std::str::from_utf8(data) {
            if let Ok(reply) = serde_json::from_str::<Reply>(text) {
                let line = serde_json::to_string(&reply).expect("a parsed reply serialises");
                let back: Reply = serde_json::from_str(&line).expect("a serialised reply parses");
                assert_eq!((back.ok, &back.error), (reply.ok, &reply.error));
                let (a, b) = (
                    Value::Object(back.fields),
                    Value::Object(reply.fields.clone()),
                );
                assert!(same(&a, &b), "{a:?} != {b:?}");
                // the typed bodies `vmm ctl`, tests and benches take out of a reply: an error
                // or a body, never a panic
                let _ = reply.body::<replies::Progress>();
                let _ = reply.body::<replies::Status>();
                let _ = reply.body::<replies::MigrationReport>();
            }
        }
    });
    // serde_json: a few dozen bytes of values per input byte at most
    assert!(
        peak <= (1 << 20) + 256 * data.len(),
        "{peak} bytes for {}",
        data.len()
    );
});
