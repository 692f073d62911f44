//! The OpenAPI document at `/api/openapi.json`: what utoipa derives from the
//! handlers' annotations, completed here with what holds for every operation alike,
//! so that the document states what the server enforces (schemathesis checks it
//! against a live aggregator: scripts/check-openapi.sh).
//!
//! Said once here rather than on each of ~60 handlers:
//! - the shared extractors answer 400 to any malformed parameter or body, 413 to a
//!   body over the limit, 401 without valid credentials, 403 to a cookie-authenticated
//!   write without the CSRF header;
//! - path parameters named after an object (`user`, `group`, `server`, `volume`)
//!   follow that object's name rule (a DNS-1123 label);
//! - links from what creates an object to what reads, changes and deletes it (so a
//!   client, and schemathesis' stateful phase, can follow them);
//! - request fields whose rules are more than a type (names, quantities, sizes; the
//!   largest volume comes from the settings) take their schemas from
//!   `kcloud_core::schema`, where tests hold each pattern to its parser.

use serde_json::{Value, json};
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use kcloud_core::schema;
use kcloud_core::settings::Settings;

use crate::extract::ACCESS_COOKIE;

/// Parameters with a rule, by where and name: user, group, server and volume names
/// are DNS-1123 labels (they end up in URLs, paths and Kubernetes names), in the path
/// or as `?user=`; `{path}` is a path inside a volume or share.
fn param_rule(place: &str, name: &str) -> Option<Value> {
    match (place, name) {
        ("path", "user" | "group" | "server" | "volume") | ("query", "user") => {
            Some(schema::dns_label())
        }
        ("path", "path") => Some(schema::file_path()),
        // Only the node history takes a range: 1s to 7 days.
        ("query", "range") => Some(schema::duration(7 * 86_400)),
        _ => None,
    }
}

/// Request-body properties (component, property) with their schemas.
fn property_rules(settings: &Settings) -> Vec<(&'static str, &'static str, Value)> {
    let or_null = |v: Value| json!({"oneOf": [v, {"type": "null"}]});
    let names = || json!({"type": "array", "items": schema::dns_label()});
    let instant = || json!({"type": "string", "format": "date-time"});
    let entries =
        || or_null(json!({"type": "array", "maxItems": 100, "items": schema::text(1, 200)}));
    let mut rules = vec![
        ("NewGroup", "description", schema::lines(500)),
        ("ChangeGroup", "description", or_null(schema::lines(500))),
        ("NewToken", "name", schema::text(1, 64)),
        ("CreateReservation", "note", schema::text(0, 500)),
        ("NewGroup", "members", names()),
        ("ChangeGroup", "add_members", names()),
        ("ChangeGroup", "remove_members", names()),
        ("CreateReservation", "start", instant()),
        ("CreateReservation", "end", instant()),
        (
            "CreateServer",
            "command",
            or_null(json!({"type": "array", "items": {"type": "string"},
                "prefixItems": [{"type": "string", "minLength": 1}]})),
        ),
        ("CreateUser", "name", schema::dns_label()),
        ("CreateServer", "name", schema::dns_label()),
        ("NewVolume", "name", schema::dns_label()),
        ("CreateServer", "cpu", or_null(schema::cpu())),
        ("CreateServer", "memory", or_null(schema::memory())),
        (
            "NewVolume",
            "size",
            or_null(schema::size(settings.storage.max_volume_bytes)),
        ),
    ];
    // What this aggregator is configured with.
    let one_of = |names: Vec<&String>| or_null(json!({"type": "string", "enum": names}));
    rules.push((
        "CreateServer",
        "preset",
        one_of(settings.presets.keys().collect()),
    ));
    rules.push((
        "CreateServer",
        "profile",
        one_of(settings.profiles.keys().collect()),
    ));
    for list in ["models", "mig_profiles", "ide_profiles", "images", "shares"] {
        rules.push(("Entitlements", list, entries()));
    }
    rules
}

/// Links: (creating operation, its statuses, links' targets, how each parameter is
/// filled).
type Link = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

const LINKS: &[Link] = &[
    (
        "create_user",
        &["201"],
        &[
            "get_user",
            "update_user",
            "delete_user",
            "list_servers",
            "list_volumes",
            "list_tokens",
        ],
        &[("user", "$response.body#/name")],
    ),
    (
        "create_group",
        &["201"],
        &["get_group", "change_group", "delete_group"],
        &[("group", "$response.body#/name")],
    ),
    (
        "create_server",
        &["201", "202"],
        &[
            "get_server",
            "patch_server",
            "delete_server",
            "server_events",
            "server_logs",
            "keep_server",
            "open_server",
        ],
        &[
            ("user", "$request.path.user"),
            ("server", "$response.body#/name"),
        ],
    ),
    (
        "create_volume",
        &["201"],
        &[
            "delete_volume",
            "volume_get",
            "volume_put",
            "volume_post",
            "volume_delete",
        ],
        &[
            ("user", "$request.path.user"),
            ("volume", "$response.body#/name"),
        ],
    ),
    (
        "create_token",
        &["201"],
        &["revoke_token"],
        &[("user", "$request.path.user"), ("id", "$response.body#/id")],
    ),
    (
        "create_reservation",
        &["201"],
        &["delete_reservation"],
        &[("user", "$request.path.user"), ("id", "$response.body#/id")],
    ),
    (
        "list_gpus",
        &["200"],
        &["list_gpus"],
        &[("cursor", "$response.body#/next_cursor")],
    ),
];

/// Adds [`LINKS`] to the responses of the operations they start from.
fn add_links(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for op in paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
    {
        let Some(id) = op["operationId"].as_str().map(str::to_owned) else {
            continue;
        };
        for (from, statuses, targets, params) in LINKS {
            if *from != id {
                continue;
            }
            let parameters: serde_json::Map<String, Value> = params
                .iter()
                .map(|(k, v)| ((*k).into(), json!(v)))
                .collect();
            for status in *statuses {
                let Some(resp) = op["responses"].get_mut(*status) else {
                    continue;
                };
                for target in *targets {
                    resp["links"][*target] =
                        json!({"operationId": target, "parameters": parameters});
                }
            }
        }
    }
}

/// The finished document, as served.
pub fn document(mut api: OpenApi, settings: &Settings) -> Value {
    api.info.title = "kcloud".into();
    api.info.version = env!("CARGO_PKG_VERSION").into();
    api.info.description = Some(
        "Self-service GPU platform. Authenticate with `Authorization: Bearer <access token>` \
         (from /api/v1/auth/login, or a personal API token) or the session cookie plus the \
         `X-CSRF-Token` header on writes. Errors are `{\"error\": {\"code\", \"message\"}}`."
            .into(),
    );
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    components.add_security_scheme(
        "agent_token",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    components.add_security_scheme(
        "cookie",
        SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(ACCESS_COOKIE))),
    );
    // utoipa's types serialize infallibly (strings, maps and numbers only).
    let mut doc = serde_json::to_value(&api).unwrap_or_else(|_| json!({}));
    complete(&mut doc);
    add_links(&mut doc);
    for missing in apply_property_rules(&mut doc, settings) {
        // Only a renamed type or field gets here; the tests catch it first.
        tracing::warn!(%missing, "OpenAPI: no such property to state a rule for");
    }
    doc
}

/// Puts [`property_rules`] in place (keeping each property's description); returns
/// the `component.property`s that do not exist.
fn apply_property_rules(doc: &mut Value, settings: &Settings) -> Vec<String> {
    let mut missing = Vec::new();
    for (component, property, rule) in property_rules(settings) {
        let Some(slot) = doc["components"]["schemas"][component]["properties"].get_mut(property)
        else {
            missing.push(format!("{component}.{property}"));
            continue;
        };
        let description = slot.get("description").cloned();
        *slot = rule;
        if let Some(d) = description {
            slot["description"] = d;
        }
    }
    missing
}

/// Adds what every operation shares (see the module's comment).
fn complete(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let write = !matches!(method.as_str(), "get" | "head" | "options");
            complete_operation(op, write);
        }
    }
}

fn complete_operation(op: &mut Value, write: bool) {
    let has_params = op
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty());
    let has_body = op.get("requestBody").is_some();
    let security: Vec<String> = op
        .get("security")
        .and_then(Value::as_array)
        .map(|reqs| {
            reqs.iter()
                .filter_map(Value::as_object)
                .flat_map(|r| r.keys().cloned())
                .collect()
        })
        .unwrap_or_default();
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params {
            let rule = match (p["in"].as_str(), p["name"].as_str()) {
                (Some(place), Some(name)) => param_rule(place, name),
                _ => None,
            };
            if let Some(rule) = rule {
                p["schema"] = rule;
            }
        }
    }
    // An upload may be empty (an empty file).
    if let Some(body) = op.get_mut("requestBody")
        && body["content"].get("application/octet-stream").is_some()
    {
        body["required"] = json!(false);
    }
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    let mut add = |status: &str, why: &str| {
        responses.entry(status).or_insert_with(|| {
            json!({
                "description": why,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            })
        });
    };
    if has_params || has_body {
        add("400", "A malformed or invalid parameter or body");
    }
    if has_body {
        add("413", "A body over the size limit");
    }
    if !security.is_empty() {
        add("401", "No valid credentials");
    }
    if write && security.iter().any(|s| s == "cookie") {
        add("403", "Not allowed, or a cookie without the CSRF header");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document of the real routes, with the default settings.
    fn real() -> (Value, Vec<String>) {
        let (_, api) = crate::api_routes().split_for_parts();
        let settings = Settings::load(None).unwrap();
        let mut doc = serde_json::to_value(&api).unwrap();
        let missing = apply_property_rules(&mut doc, &settings);
        add_links(&mut doc);
        (doc, missing)
    }

    #[test]
    fn every_rule_and_link_names_something_that_exists() {
        let (doc, missing) = real();
        assert!(
            missing.is_empty(),
            "rules for missing properties: {missing:?}"
        );
        let ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        for (from, statuses, targets, _) in LINKS {
            assert!(ids.contains(from), "link from {from}");
            for t in *targets {
                assert!(ids.contains(t), "link to {t}");
            }
            assert!(!statuses.is_empty());
        }
        // The configured names are the document's enums.
        let presets = &doc["components"]["schemas"]["CreateServer"]["properties"]["preset"];
        assert!(
            presets["oneOf"][0]["enum"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
        );
    }

    #[test]
    fn operations_gain_the_shared_statuses_and_name_rules() {
        let mut doc = json!({"paths": {
            "/api/v1/users/{user}": {
                "patch": {
                    "parameters": [{"name": "user", "in": "path", "schema": {"type": "string"}}],
                    "requestBody": {},
                    "responses": {"200": {"description": "ok"}, "400": {"description": "mine"}},
                    "security": [{"bearer": []}, {"cookie": []}],
                },
                "get": {"responses": {"200": {}}, "security": [{"bearer": []}, {"cookie": []}]},
            },
            "/healthz": {"get": {"responses": {"200": {}}}},
        }});
        complete(&mut doc);
        let patch = &doc["paths"]["/api/v1/users/{user}"]["patch"];
        assert_eq!(patch["responses"]["400"]["description"], "mine", "kept");
        for s in ["401", "403", "413"] {
            assert!(patch["responses"][s].is_object(), "{s}");
        }
        assert_eq!(patch["parameters"][0]["schema"], schema::dns_label());
        let get = &doc["paths"]["/api/v1/users/{user}"]["get"]["responses"];
        assert!(get["401"].is_object());
        assert!(get["400"].is_null() && get["403"].is_null() && get["413"].is_null());
        assert_eq!(
            doc["paths"]["/healthz"]["get"]["responses"]
                .as_object()
                .map(|r| r.len()),
            Some(1)
        );
    }
}
