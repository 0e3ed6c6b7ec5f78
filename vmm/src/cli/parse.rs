//! Parsers of the `vmm` command line's values (sizes, numbers, CPU lists, `FROM=TO` maps).

use anyhow::Result;

/// A host CPU list (`--vcpu-cpus`).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct CpuList(pub(super) Vec<usize>);

pub(super) fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    transport::sched::parse_cpu_list(s).map(CpuList)
}

pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 4G"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

pub(super) fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x hex)"))
}

/// `FROM=TO` options.
/// `FROM=TO` pairs; a bare `NAME` maps NAME to itself (the same path or tap on this host).
pub(super) fn parse_map<T: From<String>>(flag: &str, v: &[String]) -> Result<Vec<(T, T)>> {
    v.iter()
        .map(|m| match m.split_once('=') {
            Some((f, t)) if !f.is_empty() && !t.is_empty() => {
                Ok((T::from(f.to_owned()), T::from(t.to_owned())))
            }
            None if !m.is_empty() => Ok((T::from(m.clone()), T::from(m.clone()))),
            _ => Err(anyhow::anyhow!("{flag} {m:?}: expected FROM=TO or NAME")),
        })
        .collect()
}
