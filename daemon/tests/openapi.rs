//! The daemon's OpenAPI spec (daemon/api/openapi.yaml) and its router serve the same (method,
//! path) pairs.

use std::collections::BTreeSet;

use agentvm_daemon::routes::routes;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn spec_routes() -> BTreeSet<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
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

#[test]
fn spec_and_router_serve_the_same_routes() {
    let served: BTreeSet<(String, String)> = routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let spec = spec_routes();
    let missing_in_spec: Vec<_> = served.difference(&spec).collect();
    let not_served: Vec<_> = spec.difference(&served).collect();
    assert!(
        missing_in_spec.is_empty() && not_served.is_empty(),
        "served but not in daemon/api/openapi.yaml: {missing_in_spec:?}\n\
         in the spec but not served: {not_served:?}"
    );
}
