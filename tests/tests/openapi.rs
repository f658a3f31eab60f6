//! Each OpenAPI spec and its router serve the same (method, path) pairs: the per-VM API
//! (vmm/api/openapi.yaml) and the sandbox host daemon's (daemon/api/openapi.yaml).

use std::collections::BTreeSet;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// The (METHOD, path) pairs of the OpenAPI 3 document at `path` (relative to the repository).
fn spec_routes(relative: &str) -> BTreeSet<(String, String)> {
    let path = format!("{}/../{relative}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let spec: serde_norway::Value =
        serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"));
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{path} is not an OpenAPI 3 document"
    );
    let paths = spec["paths"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{path} has no `paths` mapping"));
    let mut routes = BTreeSet::new();
    for (route, ops) in paths {
        let route = route.as_str().expect("paths are strings").to_string();
        let ops = ops.as_mapping().expect("each path holds a mapping");
        for key in ops.keys() {
            let key = key.as_str().expect("operation keys are strings");
            if METHODS.contains(&key) {
                routes.insert((key.to_uppercase(), route.clone()));
            }
        }
    }
    routes
}

fn assert_same(spec: &str, served: BTreeSet<(String, String)>) {
    let documented = spec_routes(spec);
    let missing_in_spec: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing_in_spec.is_empty() && not_served.is_empty(),
        "served but not in {spec}: {missing_in_spec:?}\nin {spec} but not served: {not_served:?}"
    );
}

#[test]
fn the_per_vm_api_spec_and_router_serve_the_same_routes() {
    let served = vmm::api::routes::routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_same("vmm/api/openapi.yaml", served);
}

#[test]
fn the_daemon_spec_and_router_serve_the_same_routes() {
    let served = agentvm_daemon::routes::routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_same("daemon/api/openapi.yaml", served);
}
