//! The fault policy: which pages to request for a fault, deduplication of concurrent faults,
//! the adaptive prefetch window, matching replies to requests, and the pages a reply said are
//! on their way on the stream (`InFlight`), whose faults wait for the stream to install them.
//! No I/O: events in, actions out, so every rule is tested without a socket or a userfaultfd.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// A request for pages; the first `fault_pages` are waited on by faults, the rest are prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Req {
    /// First page.
    pub first: u64,
    /// Pages.
    pub count: u32,
    /// Leading pages a fault waits on.
    pub fault_pages: u32,
}

/// What the event loop must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send this request.
    Request(Req),
    /// The page is present already: wake whoever waits on it.
    Wake(u64),
}

/// Fault policy state.
#[derive(Debug)]
pub struct Policy {
    total_pages: u64,
    min_window: u32,
    max_window: u32,
    window: u32,
    last_fault: Option<u64>,
    in_flight: HashSet<u64>,
    /// Pages the source said are on their way on the stream: not requested again.
    streaming: HashSet<u64>,
    waiters: HashMap<u64, Vec<Instant>>,
    outstanding: VecDeque<Req>,
}

/// What a reply completed.
#[derive(Debug, Default)]
pub struct ReplyOutcome {
    /// Fault start times of the faults this reply satisfied.
    pub satisfied: Vec<Instant>,
    /// Requests for waited-on pages the reply did not carry (e.g. the server had streamed them).
    pub rerequests: Vec<Req>,
}

impl Policy {
    /// A policy for `total_pages`, prefetching `min_window..=max_window` pages per fault.
    pub fn new(total_pages: u64, min_window: u32, max_window: u32) -> Self {
        let min_window = min_window.max(1);
        Policy {
            total_pages,
            min_window,
            max_window: max_window.max(min_window),
            window: min_window,
            last_fault: None,
            in_flight: HashSet::new(),
            streaming: HashSet::new(),
            waiters: HashMap::new(),
            outstanding: VecDeque::new(),
        }
    }

    /// Current prefetch window (pages per request).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// The oldest request not yet answered.
    pub fn front(&self) -> Option<Req> {
        self.outstanding.front().copied()
    }

    /// Requests sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Pages awaited from the stream (answered `InFlight`, not yet seen present).
    pub fn streaming(&self) -> usize {
        self.streaming.len()
    }

    /// A fault on `page` at `now`. `present(p)` says whether page p is installed;
    /// `region_left(p)` how many pages from p to the end of its region.
    pub fn on_fault(
        &mut self,
        page: u64,
        now: Instant,
        present: impl Fn(u64) -> bool,
        region_left: u64,
    ) -> Option<Action> {
        if page >= self.total_pages {
            return None;
        }
        if present(page) {
            return Some(Action::Wake(page));
        }
        self.waiters.entry(page).or_default().push(now);
        if self.in_flight.contains(&page) || self.streaming.contains(&page) {
            return None; // one request per page, however many threads fault on it
        }
        // adaptive window: grow while faults walk forward through memory, reset when random
        let sequential = self
            .last_fault
            .is_some_and(|l| page > l && page - l <= 2 * u64::from(self.window));
        self.window = if sequential {
            (self.window * 2).min(self.max_window)
        } else {
            self.min_window
        };
        self.last_fault = Some(page);
        let limit = u64::from(self.window).min(region_left).max(1);
        let mut count = 1u64;
        while count < limit {
            let p = page + count;
            if p >= self.total_pages
                || present(p)
                || self.in_flight.contains(&p)
                || self.streaming.contains(&p)
            {
                break;
            }
            count += 1;
        }
        let req = Req {
            first: page,
            count: count as u32,
            fault_pages: 1,
        };
        self.track(req);
        Some(Action::Request(req))
    }

    /// A page about to be needed by someone who is not a faulting thread (see
    /// `Pager::fetch_early`): a one-page request unless it is present or already asked for. No
    /// waiter is recorded (the fault latency counts faults only) and the window stays.
    pub fn on_early(&mut self, page: u64, present: impl Fn(u64) -> bool) -> Option<Req> {
        if page >= self.total_pages
            || present(page)
            || self.in_flight.contains(&page)
            || self.streaming.contains(&page)
        {
            return None;
        }
        let req = Req {
            first: page,
            count: 1,
            fault_pages: 1,
        };
        self.track(req);
        Some(req)
    }

    fn track(&mut self, req: Req) {
        for p in req.first..req.first + u64::from(req.count) {
            self.in_flight.insert(p);
        }
        self.outstanding.push_back(req);
    }

    /// The reply to the oldest outstanding request arrived and was installed; it carried
    /// `delivered` pages from the request's first. Returns `None` if no request was outstanding
    /// or the reply does not match it (a protocol error).
    pub fn on_reply(
        &mut self,
        first: u64,
        delivered: u32,
        present: impl Fn(u64) -> bool,
    ) -> Option<(Req, ReplyOutcome)> {
        self.complete_front(first, delivered, 0, present)
    }

    /// The reply to the oldest outstanding request was `InFlight`: its leading `count` pages
    /// from `first` are on their way on the stream. Their faults keep waiting (the stream's
    /// install wakes the faulting threads; [`Policy::on_stream_arrivals`] completes the
    /// bookkeeping); waited-on pages after them are requested again. `None` if it does not
    /// match the oldest outstanding request.
    pub fn on_in_flight(
        &mut self,
        first: u64,
        count: u32,
        present: impl Fn(u64) -> bool,
    ) -> Option<(Req, ReplyOutcome)> {
        self.complete_front(first, count, count, present)
    }

    /// Completes the oldest request: `covered` pages from `first` were answered, the leading
    /// `streamed` of them by "on the stream".
    fn complete_front(
        &mut self,
        first: u64,
        covered: u32,
        streamed: u32,
        present: impl Fn(u64) -> bool,
    ) -> Option<(Req, ReplyOutcome)> {
        let req = *self.outstanding.front()?;
        if req.first != first || covered > req.count || covered == 0 {
            return None;
        }
        self.outstanding.pop_front();
        let mut out = ReplyOutcome::default();
        let stream_end = req.first + u64::from(streamed);
        for p in req.first..req.first + u64::from(req.count) {
            self.in_flight.remove(&p);
            if present(p) {
                out.satisfied
                    .extend(self.waiters.remove(&p).unwrap_or_default());
            } else if p < stream_end {
                self.streaming.insert(p);
            } else if self.waiters.contains_key(&p) {
                let r = Req {
                    first: p,
                    count: 1,
                    fault_pages: 1,
                };
                self.track(r);
                out.rerequests.push(r);
            }
        }
        Some((req, out))
    }

    /// The stream installed pages: returns the fault start times of the waiters on awaited
    /// pages that are present now.
    pub fn on_stream_arrivals(&mut self, present: impl Fn(u64) -> bool) -> Vec<Instant> {
        let mut satisfied = Vec::new();
        if self.streaming.is_empty() {
            return satisfied;
        }
        self.streaming.retain(|&p| {
            if !present(p) {
                return true;
            }
            satisfied.extend(self.waiters.remove(&p).unwrap_or_default());
            false
        });
        satisfied
    }

    /// After a reconnect: the requests to send on the new session, in order — every
    /// outstanding request again, then one for each waited-on page that was awaited from the
    /// old session's stream and never arrived (the new session, which starts from what we
    /// have, sends it once more). Call [`Policy::on_stream_arrivals`] first.
    pub fn on_reconnect(&mut self, present: impl Fn(u64) -> bool) -> Vec<Req> {
        let mut lost: Vec<u64> = self.streaming.drain().filter(|&p| !present(p)).collect();
        lost.sort_unstable();
        for p in lost {
            if self.waiters.contains_key(&p) {
                self.track(Req {
                    first: p,
                    count: 1,
                    fault_pages: 1,
                });
            }
        }
        self.outstanding.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn concurrent_faults_on_one_page_make_one_request() {
        let mut p = Policy::new(100, 1, 16);
        let a = p.on_fault(10, now(), |_| false, 90);
        assert_eq!(
            a,
            Some(Action::Request(Req {
                first: 10,
                count: 1,
                fault_pages: 1
            }))
        );
        assert_eq!(p.on_fault(10, now(), |_| false, 90), None);
        let (_, out) = p.on_reply(10, 1, |_| true).unwrap();
        assert_eq!(out.satisfied.len(), 2);
        assert!(out.rerequests.is_empty());
        assert_eq!(p.on_fault(10, now(), |_| true, 90), Some(Action::Wake(10)));
    }

    #[test]
    fn window_grows_on_sequential_faults_and_resets_on_random() {
        let mut p = Policy::new(10_000, 1, 8);
        let mut page = 0;
        let mut windows = Vec::new();
        for _ in 0..5 {
            let Some(Action::Request(r)) = p.on_fault(page, now(), |_| false, 10_000 - page) else {
                panic!()
            };
            windows.push(r.count);
            p.on_reply(r.first, r.count, |_| true).unwrap();
            page += u64::from(r.count);
        }
        assert_eq!(windows, vec![1, 2, 4, 8, 8]);
        let Some(Action::Request(r)) = p.on_fault(5000, now(), |_| false, 5000) else {
            panic!()
        };
        assert_eq!(r.count, 1);
    }

    #[test]
    fn window_stops_at_present_in_flight_and_region_end() {
        let mut p = Policy::new(100, 8, 8);
        let Some(Action::Request(r)) = p.on_fault(10, now(), |x| x == 13, 90) else {
            panic!()
        };
        assert_eq!(r.count, 3);
        let Some(Action::Request(r)) = p.on_fault(97, now(), |_| false, 2) else {
            panic!()
        };
        assert_eq!(r.count, 2);
        // a fault inside an in-flight prefetch waits, no new request
        assert_eq!(p.on_fault(11, now(), |_| false, 89), None);
    }

    #[test]
    fn an_early_fetch_is_one_request_with_no_fault_to_time() {
        let mut p = Policy::new(100, 4, 16);
        let r = p.on_early(40, |_| false).unwrap();
        assert_eq!((r.first, r.count), (40, 1));
        // asked for, present or out of range: nothing more
        assert_eq!(p.on_early(40, |_| false), None);
        assert_eq!(p.on_early(41, |x| x == 41), None);
        assert_eq!(p.on_early(100, |_| false), None);
        // a fault on it meanwhile waits for that request
        assert_eq!(p.on_fault(40, now(), |_| false, 60), None);
        let (_, out) = p.on_reply(40, 1, |x| x == 40).unwrap();
        assert_eq!(out.satisfied.len(), 1, "only the real fault is timed");
        // the window was left alone: the next fault asks for the minimum
        let Some(Action::Request(r)) = p.on_fault(70, now(), |_| false, 30) else {
            panic!()
        };
        assert_eq!(r.count, 4);
    }

    #[test]
    fn undelivered_waited_pages_are_requested_again() {
        let mut p = Policy::new(100, 4, 4);
        let Some(Action::Request(r)) = p.on_fault(0, now(), |_| false, 100) else {
            panic!()
        };
        assert_eq!(r.count, 4);
        assert_eq!(p.on_fault(2, now(), |_| false, 98), None);
        // the server sent only page 0 (pages 1.. had gone out on the stream, not yet here)
        let (_, out) = p.on_reply(0, 1, |x| x == 0).unwrap();
        assert_eq!(out.satisfied.len(), 1);
        assert_eq!(
            out.rerequests,
            vec![Req {
                first: 2,
                count: 1,
                fault_pages: 1
            }]
        );
        assert_eq!(p.outstanding(), 1);
        // a reply that matches nothing is refused
        assert!(p.on_reply(50, 1, |_| true).is_none());
    }

    #[test]
    fn in_flight_pages_wait_for_the_stream_and_are_never_requested_again() {
        let mut p = Policy::new(100, 4, 4);
        let Some(Action::Request(r)) = p.on_fault(10, now(), |_| false, 90) else {
            panic!()
        };
        assert_eq!((r.first, r.count), (10, 4));
        assert_eq!(p.on_fault(12, now(), |_| false, 88), None);
        // the stream has 10 and 11 on their way; nothing was sent for 12 and 13
        let (_, out) = p.on_in_flight(10, 2, |_| false).unwrap();
        assert!(out.satisfied.is_empty());
        // page 12 has a waiter: asked for again; 13 has none
        assert_eq!(
            out.rerequests,
            vec![Req {
                first: 12,
                count: 1,
                fault_pages: 1
            }]
        );
        assert_eq!(p.streaming(), 2);
        // another fault on an awaited page waits without a request; a window stops before one
        assert_eq!(p.on_fault(11, now(), |_| false, 89), None);
        let Some(Action::Request(r)) = p.on_fault(8, now(), |_| false, 92) else {
            panic!()
        };
        assert_eq!((r.first, r.count), (8, 2));
        // the stream installs 10: its waiter is done; 11 still awaited (two waiters)
        assert_eq!(p.on_stream_arrivals(|x| x == 10).len(), 1);
        assert_eq!(p.streaming(), 1);
        assert_eq!(p.on_stream_arrivals(|x| x <= 11).len(), 1);
        assert_eq!(p.streaming(), 0);
        // an InFlight that matches no request is refused
        assert!(p.on_in_flight(50, 1, |_| false).is_none());
        assert!(p.on_in_flight(12, 2, |_| false).is_none()); // more than asked
    }

    #[test]
    fn awaited_pages_lost_with_a_connection_are_requested_after_a_reconnect() {
        let mut p = Policy::new(100, 1, 1);
        let Some(Action::Request(a)) = p.on_fault(5, now(), |_| false, 95) else {
            panic!()
        };
        let Some(Action::Request(b)) = p.on_fault(40, now(), |_| false, 60) else {
            panic!()
        };
        let Some(Action::Request(c)) = p.on_fault(70, now(), |_| false, 30) else {
            panic!()
        };
        p.on_in_flight(a.first, 1, |_| false).unwrap();
        p.on_in_flight(b.first, 1, |_| false).unwrap();
        // the connection breaks with c outstanding, 5 and 40 awaited; 40 did arrive
        let done = p.on_stream_arrivals(|x| x == 40);
        assert_eq!(done.len(), 1);
        let again = p.on_reconnect(|x| x == 40);
        assert_eq!(again, vec![c, a]);
        assert_eq!(p.streaming(), 0);
        // the new session sends both
        assert_eq!(p.on_reply(70, 1, |_| true).unwrap().1.satisfied.len(), 1);
        assert_eq!(p.on_reply(5, 1, |_| true).unwrap().1.satisfied.len(), 1);
        assert_eq!(p.outstanding(), 0);
    }
}
