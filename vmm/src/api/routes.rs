//! The API's route table: the single list of (method, path) the server answers. The OpenAPI spec
//! (`vmm/api/openapi.yaml`) is checked against it by a test, both ways.

use hyper::Method;

use super::fault::Fault;

/// What a request asks for, once its method and path are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    GetInstanceInfo,
    PutBootSource,
    GetMachineConfig,
    PutMachineConfig,
    PatchMachineConfig,
    PutVsock,
    PutNetworkInterface,
    PutSnapshotCreate,
    PutSnapshotLoad,
    PutActions,
    PatchVm,
    PutLogger,
    PutMetrics,
    GetMetrics,
    PutAuditLog,
    PutEgressPolicy,
    GetEgressPolicy,
    PutEgressAuditLog,
    SandboxExec,
    GetSandboxFile,
    PutSandboxFile,
    ListSandboxFiles,
    SandboxWatch,
    SandboxPty,
    GetSandboxPty,
    ResizeSandboxPty,
    ConnectSandboxPort,
}

pub struct Route {
    pub method: Method,
    /// OpenAPI path template: `{name}` matches one non-empty path segment.
    pub path: &'static str,
    pub endpoint: Endpoint,
}

pub fn routes() -> [Route; 27] {
    use Endpoint::*;
    let route = |method: Method, path: &'static str, endpoint| Route {
        method,
        path,
        endpoint,
    };
    [
        route(Method::GET, "/", GetInstanceInfo),
        route(Method::PUT, "/boot-source", PutBootSource),
        route(Method::GET, "/machine-config", GetMachineConfig),
        route(Method::PUT, "/machine-config", PutMachineConfig),
        route(Method::PATCH, "/machine-config", PatchMachineConfig),
        route(Method::PUT, "/vsock", PutVsock),
        route(
            Method::PUT,
            "/network-interfaces/{iface_id}",
            PutNetworkInterface,
        ),
        route(Method::PUT, "/snapshot/create", PutSnapshotCreate),
        route(Method::PUT, "/snapshot/load", PutSnapshotLoad),
        route(Method::PUT, "/actions", PutActions),
        route(Method::PATCH, "/vm", PatchVm),
        route(Method::PUT, "/logger", PutLogger),
        route(Method::PUT, "/metrics", PutMetrics),
        route(Method::GET, "/metrics", GetMetrics),
        route(Method::PUT, "/audit-log", PutAuditLog),
        route(Method::PUT, "/egress/policy", PutEgressPolicy),
        route(Method::GET, "/egress/policy", GetEgressPolicy),
        route(Method::PUT, "/egress/audit-log", PutEgressAuditLog),
        route(Method::POST, "/sandbox/exec", SandboxExec),
        route(Method::GET, "/sandbox/files", GetSandboxFile),
        route(Method::PUT, "/sandbox/files", PutSandboxFile),
        route(Method::GET, "/sandbox/files/list", ListSandboxFiles),
        route(Method::GET, "/sandbox/watch", SandboxWatch),
        route(Method::POST, "/sandbox/pty", SandboxPty),
        route(Method::GET, "/sandbox/pty/{id}", GetSandboxPty),
        route(Method::POST, "/sandbox/pty/{id}/resize", ResizeSandboxPty),
        route(
            Method::POST,
            "/sandbox/ports/{port}/connect",
            ConnectSandboxPort,
        ),
    ]
}

/// A matched route and the value of its `{param}` segment, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub endpoint: Endpoint,
    /// The route's path template (the metrics' route label).
    pub path: &'static str,
    pub param: Option<String>,
}

/// Finds the route for `method` and `path`: 404 for an unknown path, 405 naming the allowed
/// methods for a known path with another method.
pub fn resolve(method: &Method, path: &str) -> Result<Matched, Fault> {
    let mut allowed = Vec::new();
    for route in routes() {
        if let Some(param) = match_template(route.path, path) {
            if route.method == *method {
                return Ok(Matched {
                    endpoint: route.endpoint,
                    path: route.path,
                    param,
                });
            }
            allowed.push(route.method.to_string());
        }
    }
    if allowed.is_empty() {
        Err(Fault::not_found(format!(
            "no such API resource: {path} (see vmm/api/openapi.yaml)"
        )))
    } else {
        Err(Fault::method_not_allowed(format!(
            "{method} is not supported on {path} (allowed: {})",
            allowed.join(", ")
        )))
    }
}

/// `Some(param)` when `path` fits `template`; the param is the `{...}` segment's value.
fn match_template(template: &str, path: &str) -> Option<Option<String>> {
    let path = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    let mut want = template.split('/');
    let mut got = path.split('/');
    let mut param = None;
    loop {
        match (want.next(), got.next()) {
            (None, None) => return Some(param),
            (Some(w), Some(g)) if w.starts_with('{') && w.ends_with('}') => {
                if g.is_empty() {
                    return None;
                }
                param = Some(g.to_string());
            }
            (Some(w), Some(g)) if w == g => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    #[test]
    fn resolves_paths_params_and_errors() {
        assert_eq!(
            resolve(&Method::GET, "/").unwrap().endpoint,
            Endpoint::GetInstanceInfo
        );
        assert_eq!(
            resolve(&Method::PUT, "/network-interfaces/eth0").unwrap(),
            Matched {
                endpoint: Endpoint::PutNetworkInterface,
                path: "/network-interfaces/{iface_id}",
                param: Some("eth0".into())
            }
        );
        assert_eq!(
            resolve(&Method::PUT, "/actions/").unwrap().endpoint,
            Endpoint::PutActions
        );
        assert_eq!(
            resolve(&Method::PUT, "/network-interfaces/")
                .unwrap_err()
                .status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            resolve(&Method::POST, "/sandbox/pty/7/resize").unwrap(),
            Matched {
                endpoint: Endpoint::ResizeSandboxPty,
                path: "/sandbox/pty/{id}/resize",
                param: Some("7".into())
            }
        );
        assert_eq!(
            resolve(&Method::GET, "/nope").unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        let wrong = resolve(&Method::DELETE, "/machine-config").unwrap_err();
        assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(
            wrong.message.contains("GET, PUT, PATCH"),
            "{}",
            wrong.message
        );
    }
}
