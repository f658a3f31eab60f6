//! The daemon API's route table: the one list of (method, path) it serves. The OpenAPI spec
//! (`daemon/api/openapi.yaml`) is checked against it by a test, both ways.

use hyper::Method;

use crate::fault::Fault;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    DaemonInfo,
    ListSandboxes,
    CreateSandbox,
    GetSandbox,
    DestroySandbox,
    StopSandbox,
    PauseSandbox,
    ResumeSandbox,
    HibernateSandbox,
    /// An isolate sandbox's `POST /call`, sent on to its worker.
    CallSandbox,
    ListTemplates,
    GetTemplate,
    PutTemplate,
    DeleteTemplate,
    /// Sent on to the sandbox's per-VM API at this path (its `{...}` segments filled with the
    /// request path's parameters after the sandbox id); `agent` routes need a guest agent.
    Forward {
        upstream: &'static str,
        agent: bool,
    },
}

pub struct Route {
    pub method: Method,
    /// OpenAPI path template: `{name}` matches one non-empty segment.
    pub path: &'static str,
    pub endpoint: Endpoint,
}

pub fn routes() -> Vec<Route> {
    use Endpoint::*;
    let route = |method: Method, path: &'static str, endpoint| Route {
        method,
        path,
        endpoint,
    };
    let agent = |upstream| Forward {
        upstream,
        agent: true,
    };
    vec![
        route(Method::GET, "/", DaemonInfo),
        route(Method::GET, "/sandboxes", ListSandboxes),
        route(Method::POST, "/sandboxes", CreateSandbox),
        route(Method::GET, "/sandboxes/{id}", GetSandbox),
        route(Method::DELETE, "/sandboxes/{id}", DestroySandbox),
        route(Method::POST, "/sandboxes/{id}/stop", StopSandbox),
        route(Method::POST, "/sandboxes/{id}/pause", PauseSandbox),
        route(Method::POST, "/sandboxes/{id}/resume", ResumeSandbox),
        route(Method::POST, "/sandboxes/{id}/hibernate", HibernateSandbox),
        route(Method::POST, "/sandboxes/{id}/call", CallSandbox),
        route(
            Method::GET,
            "/sandboxes/{id}/metrics",
            Forward {
                upstream: "/metrics",
                agent: false,
            },
        ),
        route(Method::POST, "/sandboxes/{id}/exec", agent("/sandbox/exec")),
        route(
            Method::GET,
            "/sandboxes/{id}/files",
            agent("/sandbox/files"),
        ),
        route(
            Method::PUT,
            "/sandboxes/{id}/files",
            agent("/sandbox/files"),
        ),
        route(
            Method::GET,
            "/sandboxes/{id}/files/list",
            agent("/sandbox/files/list"),
        ),
        route(
            Method::GET,
            "/sandboxes/{id}/watch",
            agent("/sandbox/watch"),
        ),
        route(Method::POST, "/sandboxes/{id}/pty", agent("/sandbox/pty")),
        route(
            Method::GET,
            "/sandboxes/{id}/pty/{pty_id}",
            agent("/sandbox/pty/{pty_id}"),
        ),
        route(
            Method::POST,
            "/sandboxes/{id}/pty/{pty_id}/resize",
            agent("/sandbox/pty/{pty_id}/resize"),
        ),
        route(
            Method::POST,
            "/sandboxes/{id}/ports/{port}/connect",
            agent("/sandbox/ports/{port}/connect"),
        ),
        route(Method::GET, "/templates", ListTemplates),
        route(Method::GET, "/templates/{name}", GetTemplate),
        route(Method::PUT, "/templates/{name}", PutTemplate),
        route(Method::DELETE, "/templates/{name}", DeleteTemplate),
    ]
}

/// A matched request: the endpoint and the values of its `{...}` segments, in order.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    pub endpoint: Endpoint,
    /// The route's path template (`/sandboxes/{id}/exec`), to name it in errors.
    pub path: &'static str,
    pub params: Vec<String>,
}

impl Resolved {
    /// The first parameter (the sandbox id or template name), or "" for routes without one.
    pub fn param(&self) -> &str {
        self.params.first().map(String::as_str).unwrap_or_default()
    }

    /// The per-VM path of a forwarded route, its `{...}` segments filled in order with the
    /// parameters after the first.
    pub fn upstream_path(&self, upstream: &str) -> String {
        let mut rest = self.params.iter().skip(1);
        upstream
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    rest.next().map(String::as_str).unwrap_or_default()
                } else {
                    segment
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

fn matches(template: &str, path: &str) -> Option<Vec<String>> {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    if t.len() != p.len() {
        return None;
    }
    let mut params = Vec::new();
    for (t, p) in t.iter().zip(&p) {
        if t.starts_with('{') {
            if p.is_empty() {
                return None;
            }
            params.push(p.to_string());
        } else if t != p {
            return None;
        }
    }
    Some(params)
}

pub fn resolve(method: &Method, path: &str) -> Result<Resolved, Fault> {
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let mut allowed = Vec::new();
    for route in routes() {
        if let Some(params) = matches(route.path, path) {
            if route.method == method {
                return Ok(Resolved {
                    endpoint: route.endpoint,
                    path: route.path,
                    params,
                });
            }
            allowed.push(route.method.to_string());
        }
    }
    if allowed.is_empty() {
        Err(Fault::not_found(format!("no such route: {path}")))
    } else {
        Err(Fault::new(
            hyper::StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{method} {path}: allowed methods are {}",
                allowed.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_with_their_parameter() {
        let r = resolve(&Method::POST, "/sandboxes/sb-1/pty/7/resize").unwrap();
        assert_eq!(r.params, ["sb-1", "7"]);
        assert_eq!(
            r.upstream_path("/sandbox/pty/{pty_id}/resize"),
            "/sandbox/pty/7/resize"
        );
        let r = resolve(&Method::POST, "/sandboxes/sb-1/exec").unwrap();
        assert_eq!(r.param(), "sb-1");
        assert!(matches!(
            r.endpoint,
            Endpoint::Forward {
                upstream: "/sandbox/exec",
                ..
            }
        ));
        assert_eq!(
            resolve(&Method::GET, "/sandboxes/").unwrap().endpoint,
            Endpoint::ListSandboxes
        );
        let fault = resolve(&Method::PATCH, "/sandboxes/x").unwrap_err();
        assert_eq!(fault.status, hyper::StatusCode::METHOD_NOT_ALLOWED);
        assert!(fault.message.contains("GET, DELETE"), "{fault:?}");
        assert_eq!(
            resolve(&Method::GET, "/sandboxes//stop")
                .unwrap_err()
                .status,
            hyper::StatusCode::NOT_FOUND
        );
        assert_eq!(
            resolve(&Method::GET, "/nope").unwrap_err().status,
            hyper::StatusCode::NOT_FOUND
        );
    }
}
