//! Which demo behaviour a request selects: the route table, and the query values it reads.

use super::http::Status;

/// Longest `/sleep` (and `/block`) accepted; longer values are capped to it.
pub const MAX_SLEEP_MS: u64 = 600_000;

/// Largest `/alloc` step; more is answered 400 (grow in several steps instead).
pub const MAX_ALLOC_MB: u64 = 4096;

/// What a request asks the worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /`: say which worker answered.
    Hello,
    /// `GET /sleep?ms=N`: answer after `ms` without holding up other connections.
    Sleep {
        /// Milliseconds to wait, at most [`MAX_SLEEP_MS`].
        ms: u64,
    },
    /// `GET /block?ms=N` (faults only): stall the whole event loop, as a hung worker would.
    Block {
        /// Milliseconds to stall, at most [`MAX_SLEEP_MS`].
        ms: u64,
    },
    /// `GET /crash` (faults only): exit with status 1 without answering.
    Crash,
    /// `GET /alloc?mb=N` (faults only): grow resident memory by `mb` MiB, for good.
    Alloc {
        /// MiB to add, at most [`MAX_ALLOC_MB`].
        mb: u64,
    },
    /// Answered at once with an error status; the connection stays usable.
    Reject {
        /// 400, 404 or 405.
        status: Status,
        /// The response body.
        explanation: &'static str,
    },
}

const NOT_FOUND: Route = Route::Reject {
    status: Status::NotFound,
    explanation: "not found\n",
};
const METHOD_NOT_ALLOWED: Route = Route::Reject {
    status: Status::MethodNotAllowed,
    explanation: "method not allowed\n",
};
const BAD_MS: Route = Route::Reject {
    status: Status::BadRequest,
    explanation: "bad query: expected ms=<milliseconds>\n",
};
const BAD_MB: Route = Route::Reject {
    status: Status::BadRequest,
    explanation: "bad query: expected mb=<0..=4096>\n",
};

/// Maps a request's method and target to its route. The fault routes exist only when
/// `faults` is set (`--demo-faults`); otherwise they are unknown paths.
pub fn resolve(method: &str, target: &str, faults: bool) -> Route {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let route = match path {
        "/" => Ok(Route::Hello),
        "/sleep" => query_number(query, "ms")
            .map(|ms| Route::Sleep {
                ms: ms.min(MAX_SLEEP_MS),
            })
            .ok_or(BAD_MS),
        "/block" if faults => query_number(query, "ms")
            .map(|ms| Route::Block {
                ms: ms.min(MAX_SLEEP_MS),
            })
            .ok_or(BAD_MS),
        "/crash" if faults => Ok(Route::Crash),
        "/alloc" if faults => query_number(query, "mb")
            .filter(|&mb| mb <= MAX_ALLOC_MB)
            .map(|mb| Route::Alloc { mb })
            .ok_or(BAD_MB),
        _ => return NOT_FOUND,
    };
    if !readable(method) {
        return METHOD_NOT_ALLOWED;
    }
    match route {
        Ok(route) | Err(route) => route,
    }
}

/// The demo only serves GET and HEAD.
fn readable(method: &str) -> bool {
    method == "GET" || method == "HEAD"
}

/// The first value of `name` in a `key=value&...` query, if any.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        pair.split_once('=')
            .filter(|(key, _)| *key == name)
            .map(|(_, value)| value)
    })
}

/// `name`'s value as a decimal number (digits only); `None` when absent, empty, signed,
/// fractional or too large for `u64`.
pub fn query_number(query: &str, name: &str) -> Option<u64> {
    let value = query_value(query, name)?;
    if value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_found_by_name() {
        assert_eq!(query_value("ms=5", "ms"), Some("5"));
        assert_eq!(query_value("a=1&ms=7&ms=8", "ms"), Some("7"));
        assert_eq!(query_value("ms", "ms"), None);
        assert_eq!(query_value("xms=3", "ms"), None);
        assert_eq!(query_value("", "ms"), None);
        assert_eq!(query_number("ms=42", "ms"), Some(42));
        for bad in [
            "ms=",
            "ms=-1",
            "ms=+1",
            "ms=1.5",
            "ms=abc",
            "ms=99999999999999999999999",
        ] {
            assert_eq!(query_number(bad, "ms"), None, "{bad}");
        }
    }

    #[test]
    fn hello_and_sleep_are_always_served() {
        assert_eq!(resolve("GET", "/", false), Route::Hello);
        assert_eq!(resolve("HEAD", "/?x=1", false), Route::Hello);
        assert_eq!(
            resolve("GET", "/sleep?ms=250", false),
            Route::Sleep { ms: 250 }
        );
        assert_eq!(
            resolve("GET", "/sleep?ms=99999999", false),
            Route::Sleep { ms: MAX_SLEEP_MS }
        );
    }

    #[test]
    fn bad_query_values_are_400() {
        for target in ["/sleep", "/sleep?ms=", "/sleep?ms=soon", "/sleep?seconds=1"] {
            assert_eq!(resolve("GET", target, false), BAD_MS, "{target}");
        }
        assert_eq!(resolve("GET", "/alloc?mb=lots", true), BAD_MB);
        assert_eq!(resolve("GET", "/alloc?mb=4097", true), BAD_MB);
    }

    #[test]
    fn fault_routes_exist_only_with_faults() {
        for target in ["/crash", "/block?ms=5", "/alloc?mb=1"] {
            assert_eq!(resolve("GET", target, false), NOT_FOUND, "{target}");
        }
        assert_eq!(resolve("GET", "/crash", true), Route::Crash);
        assert_eq!(resolve("GET", "/block?ms=5", true), Route::Block { ms: 5 });
        assert_eq!(resolve("GET", "/alloc?mb=3", true), Route::Alloc { mb: 3 });
    }

    #[test]
    fn unknown_paths_are_404_and_other_methods_405() {
        assert_eq!(resolve("GET", "/nope", false), NOT_FOUND);
        assert_eq!(resolve("GET", "http://example/", false), NOT_FOUND);
        assert_eq!(resolve("POST", "/", false), METHOD_NOT_ALLOWED);
        assert_eq!(resolve("DELETE", "/sleep?ms=1", false), METHOD_NOT_ALLOWED);
        assert_eq!(resolve("PUT", "/alloc?mb=1", true), METHOD_NOT_ALLOWED);
    }
}
