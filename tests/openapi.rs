//! `GET /v1/openapi.json` (SPEC §2) against the real binary: it needs no token, is
//! OpenAPI 3.1, lists exactly the routes of the contract with their methods, every one
//! of which the server really serves, documents the error body for its errors, and
//! real responses conform to the schemas it documents. (The thorough check is
//! `.ci/schemathesis`, which fuzzes a live server from the document.)
mod common;

use std::collections::BTreeSet;

use common::Server;
use reqwest::Method;
use serde_json::{Value, json};

/// Every route of the contract (SPEC §2, §3) with its methods. The router and the
/// document are built from one list (`api::routes`); this one is the contract's, so a
/// route added, removed or renamed there fails here until the contract says so.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("post", "/v1/events"),
    ("get", "/v1/events"),
    ("get", "/v1/events/{id}"),
    ("get", "/v1/events/stream"),
    ("get", "/v1/events/ws"),
    ("get", "/v1/head"),
    ("get", "/v1/export"),
    ("get", "/v1/verify"),
    ("get", "/v1/checkpoint"),
    ("get", "/v1/checkpoint/key"),
    ("get", "/v1/proof/inclusion"),
    ("get", "/v1/proof/consistency"),
    ("post", "/v1/tokens"),
    ("get", "/v1/tokens"),
    ("delete", "/v1/tokens/{id}"),
    ("post", "/v1/webhooks"),
    ("get", "/v1/webhooks"),
    ("get", "/v1/webhooks/{id}"),
    ("patch", "/v1/webhooks/{id}"),
    ("delete", "/v1/webhooks/{id}"),
    ("post", "/v1/admin/prune"),
];

/// Routes that need no token.
const PUBLIC: &[&str] = &["/", "/healthz", "/metrics", "/v1/openapi.json"];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// The document, fetched without a token.
fn document(s: &Server) -> Value {
    let r = s
        .http()
        .get(s.url("/v1/openapi.json"))
        .send()
        .expect("GET /v1/openapi.json");
    assert_eq!(r.status().as_u16(), 200, "no token needed");
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    r.json().expect("the document is JSON")
}

/// Every (method, path) the document describes.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (m.to_string(), path.clone()))
        })
        .collect()
}

#[test]
fn the_document_is_openapi_3_1_and_lists_every_route_of_the_contract() {
    let s = Server::start(&[]);
    let doc = document(&s);
    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3.1."), "{version}");
    assert_eq!(doc["info"]["title"], "cairn");

    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(operations(&doc), expected);

    // Every /v1 route but the document itself asks for a token, in either form.
    for (method, path) in &expected {
        let security = &doc["paths"][path][method]["security"];
        if PUBLIC.contains(&path.as_str()) {
            assert!(security.is_null(), "{method} {path} needs no token");
        } else {
            assert_eq!(
                security,
                &json!([{"bearer": []}, {"query_token": []}]),
                "{method} {path}"
            );
        }
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(
        schemes["bearer"],
        json!({"type": "http", "scheme": "bearer"})
    );
    assert_eq!(schemes["query_token"]["in"], "query");
    assert_eq!(schemes["query_token"]["name"], "token");
}

/// What to send to reach a documented operation's handler (not a fallback).
fn probe(s: &Server, method: &str, path: &str) -> reqwest::blocking::Response {
    let path = path.replace("{id}", "01ARZ3NDEKTSV4RRFFQ69G5FAV").replace(
        "/v1/tokens/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "/v1/tokens/0000000000000000",
    );
    let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
    let request = s.http().request(method, s.url(&path)).bearer_auth(&s.token);
    let request = match path.as_str() {
        "/v1/events" | "/v1/tokens" => request.header("content-type", "application/json"),
        _ => request,
    };
    request.body("{}").send().expect("request")
}

#[test]
fn every_documented_operation_is_served() {
    let s = Server::start(&[]);
    let doc = document(&s);
    for (method, path) in operations(&doc) {
        let r = probe(&s, &method, &path);
        let status = r.status().as_u16();
        assert_ne!(status, 405, "{method} {path} is documented but not served");
        // What the probe gets is itself documented for that operation.
        let responses = &doc["paths"][&path][&method]["responses"];
        assert!(
            responses.get(status.to_string()).is_some(),
            "{method} {path} answered {status}, which its responses do not list"
        );
        if path == "/v1/events/stream" {
            // A body that never ends: left unread.
            assert_eq!(status, 200);
            continue;
        }
        let body: Value = r.json().unwrap_or(Value::Null);
        let fallback = body["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("no route for"));
        assert!(!fallback, "{method} {path} is documented but not routed");
    }
}

/// Every response with a 4xx or 5xx status documents the one error body, and the error
/// body lists every code the contract names. `/healthz` is the exception the contract
/// makes: in cluster mode a node that is not ready answers 503 with its health body.
#[test]
fn every_error_response_is_the_error_body() {
    let s = Server::start(&[]);
    let doc = document(&s);
    for (method, path) in operations(&doc) {
        let responses = doc["paths"][&path][&method]["responses"]
            .as_object()
            .expect("responses");
        for (status, response) in responses {
            let health = path == "/healthz" && status == "503";
            if (status.starts_with('4') || status.starts_with('5')) && !health {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Error",
                    "{method} {path} {status}"
                );
            }
        }
        if !PUBLIC.contains(&path.as_str()) {
            assert!(
                responses.contains_key("401"),
                "{method} {path} documents no 401"
            );
        }
    }
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["additionalProperties"], false);
    assert_eq!(error["required"], json!(["error", "code"]));
    let codes = resolve(&doc, &error["properties"]["code"])["enum"].clone();
    for code in [
        "unauthorized",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "validation_failed",
        "bad_request",
        "payload_too_large",
        "unsupported_media_type",
        "idempotency_key_reused",
        "too_many_connections",
        "internal",
    ] {
        assert!(
            codes.as_array().unwrap().contains(&json!(code)),
            "{code} missing from {codes}"
        );
    }
}

#[test]
fn responses_conform_to_the_documented_schemas() {
    let s = Server::start(&[]);
    let doc = document(&s);

    // The empty log's head, then a head after appends.
    let (status, head) = s.get("/v1/head");
    conforms(&doc, "get", "/v1/head", status, &head);
    assert_eq!(head["data"]["id"], Value::Null);
    // The check has teeth: an undocumented member, a missing one, a wrong type.
    let schema = &doc["paths"]["/v1/head"]["get"]["responses"]["200"]["content"]["application/json"]
        ["schema"];
    for tampered in [
        json!({"data": {"seq": 0, "id": null, "hash": "", "timestamp": null, "extra": 1}}),
        json!({"data": {"seq": 0, "id": null, "timestamp": null}}),
        json!({"data": {"seq": "0", "id": null, "hash": "", "timestamp": null}}),
    ] {
        assert!(check(&doc, schema, &tampered, "$").is_err(), "{tampered}");
    }
    let batch = json!({"events": [
        {"type": "agent.start", "source": "ci", "data": {"n": 1}},
        {"type": "audit", "timestamp": "2026-03-19T12:00:00.5+02:00", "data": null},
    ]});
    let (status, ingested) = s.post_json(&batch);
    conforms(&doc, "post", "/v1/events", status, &ingested);
    let (status, head) = s.get("/v1/head");
    conforms(&doc, "get", "/v1/head", status, &head);
    assert_eq!(head["data"]["seq"], 2);

    // Tokens, with and without an allow-list; the secret only where it is created.
    let (status, created) = s.post(
        "/v1/tokens",
        "application/json",
        json!({"role": "read", "name": "dashboards", "types": ["audit", "agent.*"]}).to_string(),
    );
    conforms(&doc, "post", "/v1/tokens", status, &created);
    let (status, tokens) = s.get("/v1/tokens");
    conforms(&doc, "get", "/v1/tokens", status, &tokens);
    assert_eq!(tokens["data"].as_array().unwrap().len(), 2);

    // Events as served (hand-assembled JCS lines) against the Event schema.
    let (status, page) = s.get("/v1/events?limit=1");
    conforms(&doc, "get", "/v1/events", status, &page);
    assert!(page["next"].is_string(), "{page}");
    let id = page["data"][0]["id"].as_str().unwrap().to_string();
    let (status, one) = s.get(&format!("/v1/events/{id}"));
    conforms(&doc, "get", "/v1/events/{id}", status, &one);
    let (status, health) = s.get("/healthz");
    conforms(&doc, "get", "/healthz", status, &health);
    let (status, verified) = s.get("/v1/verify");
    conforms(&doc, "get", "/v1/verify", status, &verified);

    // Errors: a bad parameter (with details), an invalid body, an unknown event.
    let (status, bad) = s.get("/v1/events?limit=0");
    conforms(&doc, "get", "/v1/events", status, &bad);
    assert_eq!(bad["details"][0]["field"], "limit");
    let (status, invalid) = s.post_json(&json!({"type": "a", "extra": 1}));
    conforms(&doc, "post", "/v1/events", status, &invalid);
    assert_eq!(status, 400);
    let (status, missing) = s.get("/v1/events/not-an-id");
    conforms(&doc, "get", "/v1/events/{id}", status, &missing);
    assert_eq!(status, 404);
}

/// Requests that axum's own extractors would refuse with a plain-text body get the
/// documented status and the error body.
#[test]
fn refusals_of_paths_and_bodies_have_the_error_body() {
    let s = Server::start(&[]);
    let doc = document(&s);
    let send = |method: Method, path: &str, body: Vec<u8>| {
        let r = s
            .http()
            .request(method, s.url(path))
            .bearer_auth(&s.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    // A path parameter that is not UTF-8 names no event and no token.
    let (status, body) = send(Method::GET, "/v1/events/%FF%FE", Vec::new());
    assert_eq!(status, 404, "{body}");
    conforms(&doc, "get", "/v1/events/{id}", status, &body);
    let (status, body) = send(Method::DELETE, "/v1/tokens/%FF", Vec::new());
    assert_eq!(status, 404, "{body}");
    conforms(&doc, "delete", "/v1/tokens/{id}", status, &body);
    // A token body over 64 KiB (axum's own limit answered 413 in plain text at 2 MiB).
    let name = "n".repeat(70 * 1024);
    let big = json!({"role": "read", "name": name})
        .to_string()
        .into_bytes();
    let (status, body) = send(Method::POST, "/v1/tokens", big);
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large");
    conforms(&doc, "post", "/v1/tokens", status, &body);
}

/// Checks `body` against the schema `doc` gives for `method path` answering `status`.
fn conforms(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let response = &doc["paths"][path][method]["responses"][status.to_string()];
    assert!(
        !response.is_null(),
        "{method} {path}: {status} is not documented ({body})"
    );
    let schema = &response["content"]["application/json"]["schema"];
    if let Err(problem) = check(doc, schema, body, "$") {
        panic!("{method} {path} {status}: {problem}\nbody: {body}");
    }
}

/// A `$ref` followed to its schema.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .expect("a local schema reference");
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// The JSON Schema keywords the document uses, minus `pattern` and `format` (the
/// fuzzer checks those): types, `enum`, `required`, `properties`,
/// `additionalProperties: false`, `items`, `oneOf`, `minimum`, `minItems`.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(options) = schema["oneOf"].as_array() {
        let matching = options
            .iter()
            .filter(|o| check(doc, o, value, at).is_ok())
            .count();
        return if matching == 1 {
            Ok(())
        } else {
            Err(format!("{at}: {matching} of the oneOf schemas match"))
        };
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let type_ok = types.is_empty()
        || types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            other => panic!("unknown type {other}"),
        });
    if !type_ok {
        return Err(format!("{at}: {value} is not of type {types:?}"));
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let (Some(minimum), Some(n)) = (schema["minimum"].as_f64(), value.as_f64())
        && n < minimum
    {
        return Err(format!("{at}: {n} is below {minimum}"));
    }
    if let Value::Object(members) = value {
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap();
            if !members.contains_key(name) {
                return Err(format!("{at}: required member {name} is missing"));
            }
        }
        for (name, member) in members {
            match schema["properties"].get(name) {
                Some(property) => check(doc, property, member, &format!("{at}.{name}"))?,
                None if schema["additionalProperties"] == false => {
                    return Err(format!("{at}: member {name} is not documented"));
                }
                None => {}
            }
        }
    }
    if let Value::Array(items) = value {
        if let Some(min) = schema["minItems"].as_u64()
            && (items.len() as u64) < min
        {
            return Err(format!("{at}: fewer than {min} items"));
        }
        for (i, item) in items.iter().enumerate() {
            check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}
