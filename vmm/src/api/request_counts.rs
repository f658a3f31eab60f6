//! API requests counted by method, route template and response status, for `GET /metrics`.
//! Labels come from closed sets (the route table, a few methods, the statuses the server sends),
//! so a client probing random paths or methods cannot grow the metrics without bound.

use std::collections::BTreeMap;

use hyper::Method;

/// The route label of a request that matched no route (404, 405 included).
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Debug, Default, Clone)]
pub struct RequestCounts {
    counts: BTreeMap<(&'static str, &'static str, u16), u64>,
}

/// One `(method, route, status)` series and its count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestCount {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
    pub count: u64,
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl RequestCounts {
    /// `route`: the matched route's path template, or [`UNMATCHED_ROUTE`].
    pub fn add(&mut self, method: &Method, route: &'static str, status: u16) {
        *self
            .counts
            .entry((method_label(method), route, status))
            .or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn snapshot(&self) -> Vec<RequestCount> {
        self.counts
            .iter()
            .map(|(&(method, route, status), &count)| RequestCount {
                method,
                route,
                status,
                count,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_keyed_by_closed_labels() {
        let mut counts = RequestCounts::default();
        counts.add(&Method::GET, "/", 200);
        counts.add(&Method::GET, "/", 200);
        counts.add(&Method::from_bytes(b"BREW").unwrap(), UNMATCHED_ROUTE, 404);
        assert_eq!(counts.total(), 3);
        assert_eq!(
            counts.snapshot(),
            vec![
                RequestCount {
                    method: "GET",
                    route: "/",
                    status: 200,
                    count: 2
                },
                RequestCount {
                    method: "other",
                    route: UNMATCHED_ROUTE,
                    status: 404,
                    count: 1
                },
            ]
        );
    }
}
