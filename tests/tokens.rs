//! Tokens, roles and allow-lists (SPEC §2 "Authentication", "Tokens"; §4 `cairn token`)
//! against the real binary: the `/v1/tokens` API, the role every route needs, `types`
//! allow-lists on query/export/stream/ingest, revocation (also of open streams), secrets
//! kept out of logs and off the disk, the `cairn token` command offline and remote, and
//! tokens across restarts.
mod common;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use common::{Server, wait_until};
use eventsource_stream::{Event as SseEvent, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};

/// Longest wait for one response or frame (the machine is shared; a deadline, not a pace).
const READ: Duration = Duration::from_secs(30);
/// SPEC: a revoked token's open streams close within a second.
const REVOCATION_BOUND: Duration = Duration::from_secs(1);

type SseStream =
    Pin<Box<dyn Stream<Item = Result<SseEvent, EventStreamError<reqwest::Error>>> + Send>>;

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// How a request presents its token.
#[derive(Clone, Copy, Debug)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    Query(&'a str),
    /// A raw `Authorization` header value.
    Header(&'a str),
}

/// A response: status, raw body, and the body as JSON (Null if it is not JSON).
struct Reply {
    status: u16,
    text: String,
    json: Value,
}

fn with_query_token(path: &str, token: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let encoded: String = serde_urlencoded::to_string([("token", token)]).expect("urlencode");
    format!("{path}{sep}{encoded}")
}

/// One request on the harness's blocking client. A 200 event stream is not read (it
/// never ends): its body is reported as empty.
fn call(
    s: &Server,
    method: Method,
    path: &str,
    auth: Auth<'_>,
    body: Option<(&str, String)>,
) -> Reply {
    let url = match auth {
        Auth::Query(t) => s.url(&with_query_token(path, t)),
        _ => s.url(path),
    };
    let mut request = s.http().request(method, url);
    match auth {
        Auth::Bearer(t) => request = request.bearer_auth(t),
        Auth::Header(v) => request = request.header("authorization", v),
        Auth::None | Auth::Query(_) => {}
    }
    if let Some((content_type, body)) = body {
        request = request.header("content-type", content_type).body(body);
    }
    let response = request.send().expect("request");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if status == 200 && content_type.starts_with("text/event-stream") {
        return Reply {
            status,
            text: String::new(),
            json: Value::Null,
        };
    }
    let text = response.text().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply { status, text, json }
}

fn get(s: &Server, path: &str, auth: Auth<'_>) -> Reply {
    call(s, Method::GET, path, auth, None)
}

fn append_as(s: &Server, auth: Auth<'_>, events: &[Value]) -> Reply {
    call(
        s,
        Method::POST,
        "/v1/events",
        auth,
        Some(("application/json", json!({ "events": events }).to_string())),
    )
}

/// Appends with the admin token; returns the new ids.
fn append(s: &Server, events: &[Value]) -> Vec<String> {
    let r = append_as(s, Auth::Bearer(&s.token), events);
    assert_eq!(r.status, 201, "{}", r.text);
    r.json["data"]["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect()
}

fn post_token(s: &Server, body: &Value) -> Reply {
    call(
        s,
        Method::POST,
        "/v1/tokens",
        Auth::Bearer(&s.token),
        Some(("application/json", body.to_string())),
    )
}

/// Creates a token with the admin token; returns (id, secret token).
fn create_token(s: &Server, role: &str, name: &str, types: Option<&[&str]>) -> (String, String) {
    let r = post_token(s, &json!({"role": role, "name": name, "types": types}));
    assert_eq!(r.status, 201, "{}", r.text);
    let d = &r.json["data"];
    (
        d["id"].as_str().expect("id").to_string(),
        d["token"].as_str().expect("token").to_string(),
    )
}

fn list_tokens(s: &Server) -> Vec<Value> {
    let r = get(s, "/v1/tokens", Auth::Bearer(&s.token));
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["data"].as_array().expect("data array").clone()
}

fn delete_token(s: &Server, id: &str) -> Reply {
    call(
        s,
        Method::DELETE,
        &format!("/v1/tokens/{id}"),
        Auth::Bearer(&s.token),
        None,
    )
}

fn assert_error(r: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text);
    assert_eq!(r.json["code"], code, "{what}: {}", r.text);
    assert!(r.json["error"].is_string(), "{what}: {}", r.text);
}

fn data_ids(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("data array: {body}"))
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

fn ndjson_ids(text: &str) -> Vec<String> {
    text.split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("export line is JSON");
            v["id"].as_str().expect("id").to_string()
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs a blocking harness call inside `Runtime::block_on`.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn async_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .expect("async http client")
}

/// Opens `/v1/events/stream{query}`, asserts 200 and reads the `connected` frame.
async fn open_stream(http: &reqwest::Client, s: &Server, query: &str, auth: Auth<'_>) -> SseStream {
    let path = format!("/v1/events/stream{query}");
    let url = match auth {
        Auth::Query(t) => s.url(&with_query_token(&path, t)),
        _ => s.url(&path),
    };
    let mut request = http.get(url);
    if let Auth::Bearer(t) = auth {
        request = request.bearer_auth(t);
    }
    let response = tokio::time::timeout(READ, request.send())
        .await
        .expect("stream headers in time")
        .expect("GET stream");
    let status = response.status();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        panic!("stream answered {status}: {body}");
    }
    let mut es: SseStream = Box::pin(response.bytes_stream().eventsource());
    let first = next_event(&mut es).await;
    assert_eq!(first.event, "connected", "{first:?}");
    es
}

async fn next_event(es: &mut SseStream) -> SseEvent {
    match tokio::time::timeout(READ, es.next()).await {
        Err(_) => panic!("no SSE event within {READ:?}"),
        Ok(None) => panic!("the stream ended"),
        Ok(Some(Err(e))) => panic!("stream error: {e}"),
        Ok(Some(Ok(event))) => event,
    }
}

/// Events (as parsed data) up to and including the one whose id is `last`; every event
/// is checked against its frame's `id` and `event` lines.
async fn events_until(es: &mut SseStream, last: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let frame = next_event(es).await;
        let event: Value = serde_json::from_str(&frame.data)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {frame:?}"));
        assert_eq!(event["id"].as_str(), Some(frame.id.as_str()), "{frame:?}");
        assert_eq!(
            event["type"].as_str(),
            Some(frame.event.as_str()),
            "{frame:?}"
        );
        let done = frame.id == last;
        out.push(event);
        if done {
            return out;
        }
    }
    panic!("event {last} never arrived");
}

fn value_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                out.push(path);
            }
        }
    }
    out
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| contains_bytes(&std::fs::read(p).expect("read file"), needle))
        .collect()
}

/// The secret part of a token as printed by the server (`cairn_<id>_<secret>`), for
/// searching logs and files for it on its own too.
fn secret_part(token: &str) -> &str {
    token.rsplit('_').next().expect("token has a secret part")
}

fn healthz_connections(s: &Server) -> u64 {
    let r = get(s, "/healthz", Auth::None);
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["connections"].as_u64().expect("connections")
}

// ---------------------------------------------------------------------------------------
// the /v1/tokens API
// ---------------------------------------------------------------------------------------

#[test]
fn create_list_and_revoke_tokens() {
    let s = Server::start(&[]);

    let r = post_token(
        &s,
        &json!({"role": "read", "name": "grafana", "types": ["audit", "agent.*"]}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let d = &r.json["data"];
    let obj = d.as_object().expect("data object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["created_at", "id", "name", "role", "token", "types"],
        "{}",
        r.text
    );
    assert_eq!(d["role"], "read");
    assert_eq!(d["name"], "grafana");
    assert_eq!(d["types"], json!(["audit", "agent.*"]));
    let read_id = d["id"].as_str().expect("id").to_string();
    let read_secret = d["token"].as_str().expect("token").to_string();
    assert!(!read_id.is_empty());
    assert!(read_secret.len() >= 32, "a guessable token: {read_secret}");
    let created_at = d["created_at"].as_str().expect("created_at");
    assert!(
        created_at.len() >= 20 && created_at.ends_with('Z') && created_at.contains('T'),
        "created_at is RFC 3339 UTC: {created_at}"
    );

    // Without an allow-list `types` is null (present, not omitted).
    let r = post_token(&s, &json!({"role": "ingest", "name": "shipper"}));
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(
        r.json["data"].get("types").is_some_and(Value::is_null),
        "{}",
        r.text
    );
    assert_eq!(r.json["data"]["role"], "ingest");
    let ingest_id = r.json["data"]["id"].as_str().expect("id").to_string();
    let ingest_secret = r.json["data"]["token"].as_str().expect("token").to_string();
    let r = post_token(&s, &json!({"role": "admin", "name": "ops", "types": null}));
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(r.json["data"]["types"].is_null(), "{}", r.text);
    let admin2_id = r.json["data"]["id"].as_str().expect("id").to_string();
    let admin2_secret = r.json["data"]["token"].as_str().expect("token").to_string();
    let r = post_token(&s, &json!({"role": "read", "name": "n".repeat(128)}));
    assert_eq!(r.status, 201, "a 128-character name: {}", r.text);
    let long_id = r.json["data"]["id"].as_str().expect("id").to_string();
    assert_eq!(delete_token(&s, &long_id).status, 204);
    assert_ne!(read_secret, ingest_secret);
    assert_ne!(read_id, ingest_id);

    // The list: every token with id/name/role/types/created_at, never a secret.
    let list = get(&s, "/v1/tokens", Auth::Bearer(&s.token));
    assert_eq!(list.status, 200, "{}", list.text);
    for secret in [&read_secret, &ingest_secret, &admin2_secret, &s.token] {
        assert!(
            !list.text.contains(secret.as_str()),
            "a secret in the list: {}",
            list.text
        );
        assert!(
            !list.text.contains(secret_part(secret)),
            "a secret in the list: {}",
            list.text
        );
    }
    let rows = list.json["data"].as_array().expect("data array");
    assert_eq!(rows.len(), 4, "admin + 3 created: {}", list.text);
    for row in rows {
        let mut keys: Vec<&str> = row
            .as_object()
            .expect("row")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["created_at", "id", "name", "role", "types"], "{row}");
    }
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("token {id} not listed: {}", list.text))
            .clone()
    };
    let grafana = row(&read_id);
    assert_eq!(grafana["name"], "grafana");
    assert_eq!(grafana["role"], "read");
    assert_eq!(grafana["types"], json!(["audit", "agent.*"]));
    assert_eq!(grafana["created_at"], created_at);
    let shipper = row(&ingest_id);
    assert_eq!(shipper["role"], "ingest");
    assert!(shipper["types"].is_null());
    assert_eq!(row(&admin2_id)["role"], "admin");
    assert!(
        rows.iter()
            .any(|r| r["role"] == "admin" && r["id"] != admin2_id.as_str()),
        "the first admin token is listed: {}",
        list.text
    );

    // The second admin token manages tokens too.
    let r = get(&s, "/v1/tokens", Auth::Bearer(&admin2_secret));
    assert_eq!(r.status, 200, "{}", r.text);

    // Revoke: 204 with no body, then gone from the list; again (or unknown) → 404.
    let r = delete_token(&s, &read_id);
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty(), "204 has no body: {}", r.text);
    let ids: Vec<Value> = list_tokens(&s).iter().map(|r| r["id"].clone()).collect();
    assert!(
        !ids.contains(&json!(read_id)),
        "revoked token still listed: {ids:?}"
    );
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_error(
        &delete_token(&s, &read_id),
        404,
        "not_found",
        "revoking twice",
    );
    assert_error(
        &delete_token(&s, "0123456789abcdef"),
        404,
        "not_found",
        "unknown id",
    );
    assert_error(
        &delete_token(&s, "no-such-token"),
        404,
        "not_found",
        "unknown id",
    );
    assert_eq!(list_tokens(&s).len(), 3);
}

/// Posts each body; returns what went wrong: not a 400 `validation_failed`, a field not
/// named in `details`, or a detail without a message.
fn refused_bodies(s: &Server, cases: &[(Value, Vec<&str>)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (body, fields) in cases {
        let r = post_token(s, body);
        if r.status != 400 || r.json["code"] != "validation_failed" {
            failures.push(format!(
                "{body}: expected 400 validation_failed, got {} {}",
                r.status, r.text
            ));
            continue;
        }
        let named: Vec<&str> = r.json["details"]
            .as_array()
            .map(|d| d.iter().filter_map(|p| p["field"].as_str()).collect())
            .unwrap_or_default();
        for field in fields {
            if !named.contains(field) {
                failures.push(format!("{body}: details do not name {field}: {}", r.text));
            }
        }
        for p in r.json["details"].as_array().into_iter().flatten() {
            if p["message"].as_str().is_none_or(str::is_empty) {
                failures.push(format!("{body}: a detail without a message: {}", r.text));
            }
        }
    }
    failures
}

#[test]
fn bad_token_bodies_are_400_naming_the_fields() {
    let s = Server::start(&[]);
    let before = list_tokens(&s).len();

    // (body, fields that must be named)
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({"role": "root", "name": "x"}), vec!["role"]),
        (json!({"role": "READ", "name": "x"}), vec!["role"]),
        (json!({"name": "x"}), vec!["role"]),
        (json!({"role": 1, "name": "x"}), vec!["role"]),
        (json!({"role": "read"}), vec!["name"]),
        (json!({"role": "read", "name": null}), vec!["name"]),
        (json!({"role": "read", "name": 5}), vec!["name"]),
        (json!({"role": "read", "name": ""}), vec!["name"]),
        (json!({"role": "read", "name": "a\nb"}), vec!["name"]),
        (
            json!({"role": "read", "name": "x", "types": []}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "types": [1]}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "types": ["audit", null]}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "types": "audit"}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "types": {"a": 1}}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "types": ["bad type!"]}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "types": [""]}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "types": ["a,b"]}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "types": ["ag*ent"]}),
            vec!["types"],
        ),
        (
            json!({"role": "read", "name": "x", "secret": "mine"}),
            vec!["secret"],
        ),
        (
            json!({"role": "read", "name": "x", "token": "cairn_x_y"}),
            vec!["token"],
        ),
        (json!({"role": "nope"}), vec!["role", "name"]),
        (
            json!({"role": "nope", "name": "x", "extra": true}),
            vec!["role", "extra"],
        ),
        (json!({}), vec!["role", "name"]),
        (
            json!({"role": "read", "name": "n".repeat(129)}),
            vec!["name"],
        ),
        // Two problems in different fields: both are listed.
        (
            json!({"role": "nope", "name": "x", "types": []}),
            vec!["role", "types"],
        ),
    ];
    let mut failures = refused_bodies(&s, &cases);

    for raw in [
        "",
        "not json",
        "[]",
        "\"read\"",
        "{\"role\":\"read\",\"name\":\"x\"",
    ] {
        let r = call(
            &s,
            Method::POST,
            "/v1/tokens",
            Auth::Bearer(&s.token),
            Some(("application/json", raw.to_string())),
        );
        if r.status != 400 || !r.json["code"].is_string() || !r.json["error"].is_string() {
            failures.push(format!(
                "body {raw:?}: expected a 400 error body, got {} {}",
                r.status, r.text
            ));
        }
    }

    assert_eq!(
        list_tokens(&s).len(),
        before,
        "a refused request created a token"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A bad name and a bad allow-list in one body: both fields are named (as ingest lists
/// every problem, and as `parse_new_token` documents). Today only the first problem
/// `validate_new_token` finds is reported.
#[test]
fn bad_token_body_names_every_bad_field() {
    let s = Server::start(&[]);
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            json!({"role": "read", "name": "", "types": []}),
            vec!["name", "types"],
        ),
        (
            json!({"role": "read", "name": "a\u{7}b", "types": ["bad type"]}),
            vec!["name", "types"],
        ),
    ];
    let failures = refused_bodies(&s, &cases);
    assert_eq!(
        list_tokens(&s).len(),
        1,
        "a refused request created a token"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// roles and authentication on every route
// ---------------------------------------------------------------------------------------

/// (method, path, body) of every `/v1` read route.
fn read_routes(event_id: &str) -> Vec<(Method, String)> {
    vec![
        (Method::GET, "/v1/events?since=earliest".to_string()),
        (Method::GET, "/v1/export".to_string()),
        (Method::GET, "/v1/head".to_string()),
        (Method::GET, format!("/v1/events/{event_id}")),
        (Method::GET, "/v1/verify".to_string()),
        (Method::GET, "/v1/events/stream?since=earliest".to_string()),
    ]
}

/// A request: method, path and an optional (content type, body).
type Route = (Method, String, Option<(&'static str, String)>);

fn admin_routes() -> Vec<Route> {
    vec![
        (Method::GET, "/v1/tokens".to_string(), None),
        (
            Method::POST,
            "/v1/tokens".to_string(),
            Some((
                "application/json",
                json!({"role": "read", "name": "n"}).to_string(),
            )),
        ),
        (
            Method::DELETE,
            "/v1/tokens/0123456789abcdef".to_string(),
            None,
        ),
    ]
}

fn one_event() -> Option<(&'static str, String)> {
    Some((
        "application/json",
        json!({"type": "role.check"}).to_string(),
    ))
}

#[test]
fn every_route_requires_the_right_role() {
    let s = Server::start(&[]);
    let ids = append(&s, &[json!({"type": "audit", "data": {"n": 1}})]);
    let event_id = &ids[0];
    let (_, read) = create_token(&s, "read", "reader", None);
    let (_, ingest) = create_token(&s, "ingest", "shipper", None);
    let mut failures = Vec::new();
    let mut check = |who: &str, r: &Reply, want: u16, what: &str| {
        if r.status != want {
            failures.push(format!(
                "{who} {what}: expected {want}, got {} {}",
                r.status, r.text
            ));
        }
    };

    for (who, token) in [("read", &read), ("ingest", &ingest), ("admin", &s.token)] {
        for (method, path) in read_routes(event_id) {
            let r = call(&s, method.clone(), &path, Auth::Bearer(token), None);
            check(who, &r, 200, &format!("{method} {path}"));
        }
    }

    // read: no append, no token management; the message names the role needed.
    let head_before = s.head();
    let r = call(
        &s,
        Method::POST,
        "/v1/events",
        Auth::Bearer(&read),
        one_event(),
    );
    check("read", &r, 403, "POST /v1/events");
    assert_eq!(r.json["code"], "forbidden", "{}", r.text);
    assert!(
        r.json["error"]
            .as_str()
            .is_some_and(|m| m.contains("ingest")),
        "{}",
        r.text
    );
    assert_eq!(s.head(), head_before, "a refused append changed the log");
    for (who, token) in [("read", &read), ("ingest", &ingest)] {
        for (method, path, body) in admin_routes() {
            let r = call(&s, method.clone(), &path, Auth::Bearer(token), body);
            check(who, &r, 403, &format!("{method} {path}"));
            if r.status == 403 {
                assert_eq!(r.json["code"], "forbidden", "{}", r.text);
                assert!(
                    r.json["error"]
                        .as_str()
                        .is_some_and(|m| m.contains("admin")),
                    "{}",
                    r.text
                );
            }
        }
    }
    let tokens_now = list_tokens(&s).len();
    assert_eq!(tokens_now, 3, "a refused POST /v1/tokens created a token");

    // ingest and admin append.
    for (who, token) in [("ingest", &ingest), ("admin", &s.token)] {
        let r = call(
            &s,
            Method::POST,
            "/v1/events",
            Auth::Bearer(token),
            one_event(),
        );
        check(who, &r, 201, "POST /v1/events");
    }
    // admin manages tokens.
    for (method, path, body) in admin_routes() {
        let r = call(&s, method.clone(), &path, Auth::Bearer(&s.token), body);
        let want = if method == Method::DELETE {
            404
        } else if method == Method::POST {
            201
        } else {
            200
        };
        check("admin", &r, want, &format!("{method} {path}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn missing_unknown_or_malformed_tokens_are_401_on_every_route() {
    let s = Server::start(&[]);
    let ids = append(&s, &[json!({"type": "audit"})]);
    let (read_id, read) = create_token(&s, "read", "reader", None);
    let wrong_secret = format!("cairn_{read_id}_{}", "0".repeat(48));
    let head_before = s.head();

    let mut routes: Vec<Route> = read_routes(&ids[0])
        .into_iter()
        .map(|(m, p)| (m, p, None))
        .collect();
    routes.push((Method::POST, "/v1/events".into(), one_event()));
    routes.extend(admin_routes());

    let padded = format!("{}x", s.token);
    let bad: Vec<(&str, Auth<'_>)> = vec![
        ("no token", Auth::None),
        (
            "unknown token",
            Auth::Bearer("cairn_0123456789abcdef_00112233445566778899aabbccddeeff0011223344556677"),
        ),
        ("wrong secret", Auth::Bearer(&wrong_secret)),
        ("garbage", Auth::Bearer("garbage")),
        ("empty bearer", Auth::Header("Bearer ")),
        ("bare scheme", Auth::Header("Bearer")),
        ("basic scheme", Auth::Header("Basic YWRtaW46YWRtaW4=")),
        ("token without scheme", Auth::Header(&read)),
        ("unknown ?token=", Auth::Query("cairn_nope_nope")),
        ("empty ?token=", Auth::Query("")),
        ("wrong secret ?token=", Auth::Query(&wrong_secret)),
        ("admin token with a suffix", Auth::Bearer(&padded)),
    ];

    let mut failures = Vec::new();
    for (what, auth) in &bad {
        for (method, path, body) in &routes {
            let r = call(&s, method.clone(), path, *auth, body.clone());
            if r.status != 401 || r.json["code"] != "unauthorized" || !r.json["error"].is_string() {
                failures.push(format!(
                    "{what} on {method} {path}: {} {}",
                    r.status, r.text
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        s.head(),
        head_before,
        "an unauthenticated append changed the log"
    );
    assert_eq!(
        list_tokens(&s).len(),
        2,
        "an unauthenticated POST created a token"
    );
    // Unknown routes stay 404 with or without a token.
    assert_eq!(get(&s, "/v1/nope", Auth::None).status, 404);
    assert_eq!(get(&s, "/v1/nope", Auth::Bearer(&read)).status, 404);
}

#[test]
fn query_parameter_token_works_like_the_header() {
    let s = Server::start(&[]);
    let ids = append(&s, &[json!({"type": "audit"})]);
    let (_, read) = create_token(&s, "read", "reader", None);
    let (_, ingest) = create_token(&s, "ingest", "shipper", None);

    for (method, path) in read_routes(&ids[0]) {
        let r = call(&s, method.clone(), &path, Auth::Query(&read), None);
        assert_eq!(r.status, 200, "?token= on {method} {path}: {}", r.text);
    }
    let r = call(
        &s,
        Method::POST,
        "/v1/events",
        Auth::Query(&ingest),
        one_event(),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let r = call(
        &s,
        Method::POST,
        "/v1/events",
        Auth::Query(&read),
        one_event(),
    );
    assert_error(&r, 403, "forbidden", "read ?token= appending");
    let r = get(&s, "/v1/tokens", Auth::Query(&s.token));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = get(&s, "/v1/tokens", Auth::Query(&read));
    assert_error(&r, 403, "forbidden", "read ?token= listing tokens");
    assert_eq!(s.head()["seq"], 2);
}

// ---------------------------------------------------------------------------------------
// allow-lists
// ---------------------------------------------------------------------------------------

/// Types for allow-list tests and whether `["audit", "agent.*"]` admits them.
const MIXED: [(&str, bool); 9] = [
    ("audit", true),
    ("audit.login", false),
    ("agent.created", true),
    ("other", false),
    ("agent", false),
    ("agentx.created", false),
    ("agent.deleted", true),
    ("Audit", false),
    ("agent.a.b", true),
];

fn allowed(event_type: &str) -> bool {
    event_type == "audit" || event_type.starts_with("agent.")
}

/// Appends the MIXED types (twice, interleaved) and returns (id, type) in log order.
fn append_mixed(s: &Server) -> Vec<(String, String)> {
    let events: Vec<Value> = MIXED
        .iter()
        .chain(MIXED.iter().rev())
        .enumerate()
        .map(|(i, (t, _))| json!({"type": t, "data": {"i": i}, "source": if i % 2 == 0 { "even" } else { "odd" }}))
        .collect();
    let ids = append(s, &events);
    ids.into_iter()
        .zip(
            events
                .iter()
                .map(|e| e["type"].as_str().expect("type").to_string()),
        )
        .collect()
}

fn ids_where(log: &[(String, String)], pred: impl Fn(&str) -> bool) -> Vec<String> {
    log.iter()
        .filter(|(_, t)| pred(t))
        .map(|(id, _)| id.clone())
        .collect()
}

#[test]
fn allow_list_limits_query_export_and_single_reads() {
    let s = Server::start(&[]);
    let log = append_mixed(&s);
    for (t, admitted) in MIXED {
        assert_eq!(allowed(t), admitted, "test table for {t}");
    }
    let (_, restricted) = create_token(&s, "read", "grafana", Some(&["audit", "agent.*"]));
    let auth = Auth::Bearer(&restricted);
    let visible = ids_where(&log, allowed);
    assert_eq!(visible.len(), 8);

    let query = |params: &str| -> Vec<String> {
        let r = get(
            &s,
            &format!("/v1/events?since=earliest&limit=1000{params}"),
            auth,
        );
        assert_eq!(r.status, 200, "{params}: {}", r.text);
        for e in r.json["data"].as_array().expect("data") {
            assert!(
                allowed(e["type"].as_str().expect("type")),
                "{params}: outside the allow-list: {e}"
            );
        }
        data_ids(&r.json)
    };
    assert_eq!(query(""), visible, "query without filters");
    // Filters are intersected with the allow-list.
    assert_eq!(query("&types=other"), Vec::<String>::new());
    assert_eq!(
        query("&types=audit.login,Audit,agent"),
        Vec::<String>::new()
    );
    assert_eq!(
        query("&types=audit,other"),
        ids_where(&log, |t| t == "audit")
    );
    assert_eq!(
        query("&types=agent*"),
        ids_where(&log, |t| t.starts_with("agent."))
    );
    assert_eq!(query("&types=*"), visible);
    assert_eq!(
        query("&types=agent.created,audit.login"),
        ids_where(&log, |t| t == "agent.created")
    );
    let odd: Vec<String> = log
        .iter()
        .enumerate()
        .filter(|(i, (_, t))| i % 2 == 1 && allowed(t))
        .map(|(_, (id, _))| id.clone())
        .collect();
    assert_eq!(query("&source=odd"), odd);
    // The unrestricted admin sees everything (the filter is the token's, not global).
    let r = get(
        &s,
        "/v1/events?since=earliest&limit=1000",
        Auth::Bearer(&s.token),
    );
    assert_eq!(data_ids(&r.json).len(), log.len());

    // Paging (both orders) walks exactly the allowed events.
    let mut pages = Vec::new();
    let mut since = "earliest".to_string();
    for _ in 0..=visible.len() {
        let r = get(&s, &format!("/v1/events?since={since}&limit=3"), auth);
        assert_eq!(r.status, 200, "{}", r.text);
        pages.extend(data_ids(&r.json));
        match r.json["next"].as_str() {
            Some(next) => since = next.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, visible, "asc pages");
    let mut pages = Vec::new();
    let mut until = String::new();
    for _ in 0..=visible.len() {
        let r = get(&s, &format!("/v1/events?order=desc&limit=3{until}"), auth);
        assert_eq!(r.status, 200, "{}", r.text);
        pages.extend(data_ids(&r.json));
        match r.json["next"].as_str() {
            Some(next) => until = format!("&until={next}"),
            None => break,
        }
    }
    let mut reversed = visible.clone();
    reversed.reverse();
    assert_eq!(pages, reversed, "desc pages");

    // Export.
    let export = |params: &str| -> Vec<String> {
        let r = get(&s, &format!("/v1/export{params}"), auth);
        assert_eq!(r.status, 200, "{params}: {}", r.text);
        ndjson_ids(&r.text)
    };
    assert_eq!(export(""), visible);
    assert_eq!(export("?since=earliest"), visible);
    assert_eq!(export("?types=other"), Vec::<String>::new());
    assert_eq!(
        export("?types=audit,other"),
        ids_where(&log, |t| t == "audit")
    );
    assert_eq!(export("?types=agent.*&source=even"), {
        log.iter()
            .enumerate()
            .filter(|(i, (_, t))| i % 2 == 0 && t.starts_with("agent."))
            .map(|(_, (id, _))| id.clone())
            .collect::<Vec<_>>()
    });

    // One event: an event outside the allow-list does not exist for this token.
    for (id, t) in &log {
        let r = get(&s, &format!("/v1/events/{id}"), auth);
        if allowed(t) {
            assert_eq!(r.status, 200, "{t}: {}", r.text);
            assert_eq!(r.json["data"]["id"], id.as_str());
        } else {
            assert_error(
                &r,
                404,
                "not_found",
                &format!("GET /v1/events/{{id}} of type {t}"),
            );
            assert!(
                !r.text.contains(&format!("\"{t}\"")),
                "the 404 reveals the type: {}",
                r.text
            );
        }
        assert_eq!(
            get(&s, &format!("/v1/events/{id}"), Auth::Bearer(&s.token)).status,
            200
        );
    }

    // verify reads every event: 403; head stays allowed and is the real head.
    assert_error(
        &get(&s, "/v1/verify", auth),
        403,
        "forbidden",
        "verify with an allow-list",
    );
    assert_error(
        &get(&s, "/v1/verify?from_seq=1&to_seq=1", auth),
        403,
        "forbidden",
        "verify with an allow-list",
    );
    let r = get(&s, "/v1/head", auth);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["data"], s.head());
    assert_eq!(r.json["data"]["seq"], log.len());
}

#[test]
fn allow_listed_stream_replays_and_delivers_only_allowed_types() {
    let s = Server::start(&[]);
    let mut log = append_mixed(&s);
    // The replay ends with an allowed marker, so anything outside the allow-list would
    // arrive before it.
    let marker = append(
        &s,
        &[json!({"type": "audit", "data": {"marker": "replay"}})],
    );
    log.push((marker[0].clone(), "audit".into()));
    let (_, restricted) = create_token(&s, "read", "grafana", Some(&["audit", "agent.*"]));
    let rt = runtime();
    rt.block_on(async {
        let http = async_client();
        let mut all = open_stream(&http, &s, "?since=earliest", Auth::Bearer(&restricted)).await;
        let mut narrowed = open_stream(
            &http,
            &s,
            "?since=earliest&types=other,audit",
            Auth::Query(&restricted),
        )
        .await;
        let mut live = open_stream(&http, &s, "", Auth::Bearer(&restricted)).await;

        let got = events_until(&mut all, &marker[0]).await;
        assert_eq!(value_ids(&got), ids_where(&log, allowed), "replay");
        let got = events_until(&mut narrowed, &marker[0]).await;
        assert_eq!(
            value_ids(&got),
            ids_where(&log, |t| t == "audit"),
            "replay, types=other,audit"
        );

        // Live: disallowed types first, then allowed ones, then an allowed end marker.
        let live_types = [
            "other",
            "agent.live",
            "audit.login",
            "agentx",
            "Audit",
            "audit",
        ];
        let live_events: Vec<Value> = live_types
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"type": t, "data": {"live": i}}))
            .collect();
        let ids = blocking(|| append(&s, &live_events));
        let last = ids.last().expect("ids").clone();
        let live_log: Vec<(String, String)> = ids
            .into_iter()
            .zip(live_types.iter().map(|t| t.to_string()))
            .collect();
        let got = events_until(&mut all, &last).await;
        assert_eq!(value_ids(&got), ids_where(&live_log, allowed), "live");
        let got = events_until(&mut narrowed, &last).await;
        assert_eq!(
            value_ids(&got),
            ids_where(&live_log, |t| t == "audit"),
            "live, types=other,audit"
        );
        let got = events_until(&mut live, &last).await;
        assert_eq!(
            value_ids(&got),
            ids_where(&live_log, allowed),
            "live-only stream"
        );
    });
}

#[test]
fn allow_listed_ingest_token_appends_only_its_types() {
    let s = Server::start(&[]);
    append(&s, &[json!({"type": "seed"})]);
    let (_, shipper) = create_token(&s, "ingest", "shipper", Some(&["audit", "agent.*"]));
    let auth = Auth::Bearer(&shipper);

    let r = append_as(
        &s,
        auth,
        &[json!({"type": "audit"}), json!({"type": "agent.created"})],
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let head = s.head();
    let lines_before = s.export_lines();
    assert_eq!(lines_before.len(), 3);

    let refused: Vec<Vec<Value>> = vec![
        vec![json!({"type": "other"})],
        vec![json!({"type": "agent"})],
        vec![json!({"type": "audit.login"})],
        vec![
            json!({"type": "audit"}),
            json!({"type": "other"}),
            json!({"type": "agent.x"}),
        ],
    ];
    for events in &refused {
        let r = append_as(&s, auth, events);
        assert_error(&r, 403, "forbidden", &format!("appending {events:?}"));
        assert!(
            r.json["error"].as_str().is_some_and(|m| events
                .iter()
                .filter(|e| !allowed(e["type"].as_str().unwrap_or("")))
                .all(|e| m.contains(e["type"].as_str().unwrap_or("?")))),
            "the message names the refused types: {}",
            r.text
        );
    }
    // A single event object and NDJSON are held to the same list.
    let r = call(
        &s,
        Method::POST,
        "/v1/events",
        auth,
        Some(("application/json", json!({"type": "other"}).to_string())),
    );
    assert_error(&r, 403, "forbidden", "single event outside the list");
    let r = call(
        &s,
        Method::POST,
        "/v1/events",
        auth,
        Some((
            "application/x-ndjson",
            "{\"type\":\"agent.ok\"}\n{\"type\":\"nope\"}\n".to_string(),
        )),
    );
    assert_error(&r, 403, "forbidden", "NDJSON with a type outside the list");
    let r = call(
        &s,
        Method::POST,
        "/v1/events",
        Auth::Query(&shipper),
        Some(("application/json", json!({"type": "other"}).to_string())),
    );
    assert_error(&r, 403, "forbidden", "?token= append outside the list");
    assert_eq!(s.head(), head, "a refused append changed the head");
    assert_eq!(
        s.export_lines(),
        lines_before,
        "a refused append changed the log"
    );

    // It reads only its types too.
    let r = get(&s, "/v1/events?since=earliest", auth);
    assert_eq!(r.status, 200, "{}", r.text);
    let types: Vec<&str> = r.json["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(types, ["audit", "agent.created"]);

    let r = call(
        &s,
        Method::POST,
        "/v1/events",
        auth,
        Some((
            "application/x-ndjson",
            "{\"type\":\"agent.ok\"}\n{\"type\":\"audit\"}\n".to_string(),
        )),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s.head()["seq"], 5);
}

// ---------------------------------------------------------------------------------------
// revocation
// ---------------------------------------------------------------------------------------

#[test]
fn revocation_is_immediate_for_requests_and_open_streams() {
    let s = Server::start(&[]);
    append(&s, &[json!({"type": "seed"})]);
    let (doomed_id, doomed) = create_token(&s, "read", "doomed", None);
    let (_, other) = create_token(&s, "read", "other", None);
    assert_eq!(get(&s, "/v1/head", Auth::Bearer(&doomed)).status, 200);

    let rt = runtime();
    rt.block_on(async {
        let http = async_client();
        let mut by_header = open_stream(&http, &s, "?since=earliest", Auth::Bearer(&doomed)).await;
        let mut by_query = open_stream(&http, &s, "", Auth::Query(&doomed)).await;
        let mut survivor = open_stream(&http, &s, "", Auth::Bearer(&other)).await;
        blocking(|| {
            wait_until(READ, "3 open streams", || healthz_connections(&s) == 3);
        });
        let seed = next_event(&mut by_header).await;
        assert_eq!(seed.event, "seed");

        let r = blocking(|| delete_token(&s, &doomed_id));
        assert_eq!(r.status, 204, "{}", r.text);
        // Both streams of the revoked token end within the SPEC's second (end of body
        // or an error both count; events already in flight may come first).
        let ended = tokio::time::timeout(REVOCATION_BOUND, async {
            let mut open = [true, true];
            while open.iter().any(|o| *o) {
                tokio::select! {
                    item = by_header.next(), if open[0] => {
                        if matches!(item, None | Some(Err(_))) { open[0] = false; }
                    }
                    item = by_query.next(), if open[1] => {
                        if matches!(item, None | Some(Err(_))) { open[1] = false; }
                    }
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "a revoked token's stream was still open 1 s after DELETE returned"
        );

        // The next request with it: 401, on every kind of route.
        blocking(|| {
            for path in ["/v1/head", "/v1/events", "/v1/export", "/v1/events/stream"] {
                assert_error(
                    &get(&s, path, Auth::Bearer(&doomed)),
                    401,
                    "unauthorized",
                    path,
                );
                assert_error(
                    &get(&s, path, Auth::Query(&doomed)),
                    401,
                    "unauthorized",
                    path,
                );
            }
        });

        // The other token's stream stays open and keeps delivering.
        let ids = blocking(|| append(&s, &[json!({"type": "after.revoke"})]));
        let got = events_until(&mut survivor, &ids[0]).await;
        assert_eq!(value_ids(&got), ids);
        let ids = blocking(|| append(&s, &[json!({"type": "after.revoke.2"})]));
        let got = events_until(&mut survivor, &ids[0]).await;
        assert_eq!(value_ids(&got), ids);
        assert_eq!(get_async_status(&http, &s, &other).await, 200);
        blocking(|| {
            wait_until(READ, "only the surviving stream open", || {
                healthz_connections(&s) == 1
            });
        });
    });
}

async fn get_async_status(http: &reqwest::Client, s: &Server, token: &str) -> u16 {
    tokio::time::timeout(READ, http.get(s.url("/v1/head")).bearer_auth(token).send())
        .await
        .expect("response in time")
        .expect("GET /v1/head")
        .status()
        .as_u16()
}

#[test]
fn revoking_an_admin_token_takes_token_management_away() {
    let s = Server::start(&[]);
    let (id, second_admin) = create_token(&s, "admin", "second", None);
    let (_, victim) = create_token(&s, "read", "victim", None);
    assert_eq!(
        get(&s, "/v1/tokens", Auth::Bearer(&second_admin)).status,
        200
    );
    let victim_id = list_tokens(&s)
        .iter()
        .find(|r| r["name"] == "victim")
        .and_then(|r| r["id"].as_str().map(str::to_string))
        .expect("victim listed");
    assert_eq!(delete_token(&s, &id).status, 204);
    let r = call(
        &s,
        Method::DELETE,
        &format!("/v1/tokens/{victim_id}"),
        Auth::Bearer(&second_admin),
        None,
    );
    assert_error(&r, 401, "unauthorized", "DELETE with a revoked admin token");
    assert_eq!(
        get(&s, "/v1/head", Auth::Bearer(&victim)).status,
        200,
        "the victim survived"
    );
}

// ---------------------------------------------------------------------------------------
// secrets stay secret
// ---------------------------------------------------------------------------------------

#[test]
fn secrets_never_reach_the_info_log() {
    let s = Server::start(&[]);
    let ids = append(&s, &[json!({"type": "audit"})]);
    let (read_id, read) = create_token(&s, "read", "reader", None);
    let (_, ingest) = create_token(&s, "ingest", "shipper", Some(&["audit"]));
    let wrong = format!("cairn_{read_id}_{}", "f".repeat(48));
    for token in [&read, &ingest, &wrong, &s.token] {
        for (method, path) in read_routes(&ids[0]) {
            call(&s, method.clone(), &path, Auth::Query(token), None);
            call(&s, method, &path, Auth::Bearer(token), None);
        }
        call(
            &s,
            Method::POST,
            "/v1/events",
            Auth::Query(token),
            one_event(),
        );
        get(&s, "/v1/tokens", Auth::Query(token));
        get(&s, "/v1/nope", Auth::Query(token));
    }
    let (revoked_id, revoked) = create_token(&s, "read", "revoked", None);
    assert_eq!(delete_token(&s, &revoked_id).status, 204);
    assert_eq!(get(&s, "/v1/head", Auth::Query(&revoked)).status, 401);
    let mut s = s;
    assert!(s.terminate().success());

    let log = s.log.lock().expect("log").clone();
    assert!(
        log.contains("admin.token"),
        "the server logs where the admin token is:\n{log}"
    );
    assert!(
        log.contains("token created"),
        "the log has token events (it is the real log):\n{log}"
    );
    for token in [&read, &ingest, &wrong, &s.token, &revoked] {
        assert!(!log.contains(token.as_str()), "a token in the log:\n{log}");
        assert!(
            !log.contains(secret_part(token)),
            "a token's secret in the log:\n{log}"
        );
    }
}

#[test]
fn debug_request_log_redacts_query_tokens() {
    let d = Server::start_with_env(&[], &[("RUST_LOG", "debug")]);
    let admin = std::fs::read_to_string(d.data.join("admin.token"))
        .expect("admin.token")
        .trim()
        .to_string();
    let http = reqwest::blocking::Client::builder()
        .timeout(READ)
        .build()
        .expect("client");
    let url = |p: &str| format!("http://{}{p}", d.addr);
    let r = http
        .post(url("/v1/tokens"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(json!({"role": "ingest", "name": "dbg"}).to_string())
        .send()
        .expect("POST /v1/tokens");
    assert_eq!(r.status(), 201);
    let body: Value = r.json().expect("json");
    let secret = body["data"]["token"].as_str().expect("token").to_string();
    let id = body["data"]["id"].as_str().expect("id").to_string();
    let wrong = format!("cairn_{id}_{}", "e".repeat(48));

    let enc = |t: &str| serde_urlencoded::to_string([("token", t)]).expect("urlencode");
    let mut statuses = Vec::new();
    for t in [&secret, &admin, &wrong] {
        for path in [
            format!("/v1/head?{}", enc(t)),
            format!("/v1/events?since=earliest&{}&limit=5", enc(t)),
            format!("/v1/export?{}", enc(t)),
            format!("/v1/tokens?{}", enc(t)),
            format!("/v1/nope?{}", enc(t)),
            // The key percent-encoded: authentication decodes it, so must redaction.
            format!("/v1/head?tok%65n={t}"),
        ] {
            let r = http.get(url(&path)).send().expect("GET");
            statuses.push((path.replace(t.as_str(), "<t>"), r.status().as_u16()));
        }
        let r = http
            .post(url(&format!("/v1/events?{}", enc(t))))
            .header("content-type", "application/json")
            .body(json!({"type": "dbg"}).to_string())
            .send()
            .expect("POST");
        statuses.push(("POST /v1/events".into(), r.status().as_u16()));
        let r = http
            .get(url("/v1/head"))
            .bearer_auth(t)
            .send()
            .expect("GET with header");
        statuses.push(("header".into(), r.status().as_u16()));
        // A stream: its request line is logged when the response starts.
        let r = http
            .get(url(&format!("/v1/events/stream?{}", enc(t))))
            .send()
            .expect("GET stream");
        statuses.push(("stream".into(), r.status().as_u16()));
        drop(r);
    }
    // The right token authenticates through ?tok%65n= too (so it is a token parameter).
    assert!(
        statuses
            .iter()
            .any(|(p, st)| p.starts_with("/v1/head?tok%65n=") && *st == 200),
        "{statuses:?}"
    );
    // Request lines are written after each response: wait for the last one.
    wait_until(READ, "request lines in the debug log", || {
        let log = d.log_text();
        log.matches("token=REDACTED").count() >= 3 * 8
            && log.contains("/v1/events/stream?token=REDACTED")
    });
    let log = d.log_text();
    for t in [&secret, &admin, &wrong] {
        assert!(
            !log.contains(t.as_str()),
            "a token in the debug log:\n{log}"
        );
        assert!(
            !log.contains(secret_part(t)),
            "a token's secret in the debug log:\n{log}"
        );
    }
    for line in log.lines().filter(|l| l.contains("uri=")) {
        let rest = line.replace("token=REDACTED", "");
        assert!(
            !rest.contains("token=") && !rest.contains("tok%65n="),
            "an unredacted token parameter: {line}"
        );
    }
    assert!(log.contains("/v1/head?token=REDACTED"), "{log}");
    assert!(log.contains("/v1/nope?token=REDACTED"), "{log}");
    assert!(
        log.contains("since=earliest&token=REDACTED&limit=5"),
        "other parameters are kept:\n{log}"
    );
}

#[test]
fn only_hashes_of_secrets_reach_the_disk() {
    let mut s = Server::start(&[]);
    append(&s, &[json!({"type": "audit"})]);
    let mut secrets = Vec::new();
    let mut names = Vec::new();
    for (i, role) in ["read", "ingest", "admin"].iter().enumerate() {
        let name = format!("disk-check-name-{i}-{role}");
        let (_, secret) = create_token(
            &s,
            role,
            &name,
            if i == 0 { Some(&["audit"]) } else { None },
        );
        // Use it, so nothing about a request with it lands on disk either (idempotency
        // records are keyed by the token id, not the secret).
        let r = call(
            &s,
            Method::POST,
            "/v1/events",
            Auth::Bearer(&secret),
            Some(("application/json", json!({"type": "audit"}).to_string())),
        );
        assert_eq!(
            r.status,
            if *role == "read" { 403 } else { 201 },
            "{}",
            r.text
        );
        secrets.push(secret);
        names.push(name);
    }
    assert!(s.terminate().success());
    let data = s.data.clone();
    let (code, out, err) = common::cairn(
        &[
            "token",
            "create",
            "--role",
            "read",
            "--name",
            "disk-check-offline",
            "--data",
            data.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    secrets.push(out.trim().to_string());
    names.push("disk-check-offline".into());

    let files = files_under(&data);
    assert!(files.len() > 2, "the data directory has files: {files:?}");
    // The scan sees the token records (their names are stored as plain bytes)...
    for name in &names {
        assert!(
            !files_containing(&data, name.as_bytes()).is_empty(),
            "the scan never found token name {name}: it would not find a secret either"
        );
    }
    // ... and no file holds a created secret, as text or as raw bytes.
    for secret in &secrets {
        let part = secret_part(secret);
        let mut needles: Vec<Vec<u8>> = vec![secret.as_bytes().to_vec(), part.as_bytes().to_vec()];
        if let Ok(raw) = hex::decode(part) {
            needles.push(raw);
        }
        for needle in &needles {
            let found = files_containing(&data, needle);
            assert!(found.is_empty(), "a token secret is stored in {found:?}");
        }
    }
    // The first admin token is in admin.token (mode 0600, the token alone on one line)
    // and nowhere else.
    let admin_file = data.join("admin.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&admin_file)
            .expect("admin.token")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "admin.token mode {:o}", mode & 0o777);
    assert_eq!(
        std::fs::read_to_string(&admin_file).expect("admin.token"),
        format!("{}\n", s.token)
    );
    let found = files_containing(&data, secret_part(&s.token).as_bytes());
    assert_eq!(
        found,
        vec![data.join("admin.token")],
        "the admin secret on disk"
    );
}

// ---------------------------------------------------------------------------------------
// cairn token
// ---------------------------------------------------------------------------------------

/// The secret printed by `cairn token create`: alone on one line.
fn printed_secret(code: i32, out: &str, err: &str) -> String {
    assert_eq!(code, 0, "cairn token create failed: {err}");
    assert_eq!(out.lines().count(), 1, "stdout is one line: {out:?}");
    assert!(out.ends_with('\n'), "{out:?}");
    let secret = out.trim_end_matches('\n');
    assert!(
        !secret.is_empty() && !secret.contains(char::is_whitespace),
        "{out:?}"
    );
    secret.to_string()
}

fn listed<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no token named {name}: {rows:?}"))
}

#[test]
fn token_command_remote_and_offline() {
    let mut s = Server::start(&[]);
    append(
        &s,
        &[
            json!({"type": "a"}),
            json!({"type": "b"}),
            json!({"type": "c"}),
        ],
    );
    let url = format!("http://{}", s.addr);
    let data = s.data.clone();
    let data_arg = data.to_str().expect("utf-8 path").to_string();
    let admin = s.token.clone();

    // Remote create: the secret alone on stdout; it works and carries its allow-list.
    let (code, out, err) = common::cairn(
        &[
            "token", "create", "--role", "read", "--name", "x", "--types", "a,b", "--url", &url,
            "--token", &admin,
        ],
        &[],
    );
    let x = printed_secret(code, &out, &err);
    let rows = list_tokens(&s);
    let x_row = listed(&rows, "x");
    assert_eq!(x_row["role"], "read");
    assert_eq!(x_row["types"], json!(["a", "b"]));
    let x_id = x_row["id"].as_str().expect("id").to_string();
    let r = get(&s, "/v1/events?since=earliest", Auth::Bearer(&x));
    assert_eq!(r.status, 200, "{}", r.text);
    let types: Vec<&str> = r.json["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(types, ["a", "b"]);
    assert!(!err.contains(&x), "the secret on stderr: {err}");

    // Remote create through CAIRN_URL / CAIRN_TOKEN, without an allow-list.
    let (code, out, err) = common::cairn(
        &[
            "token",
            "create",
            "--role",
            "ingest",
            "--name",
            "remote-env",
        ],
        &[("CAIRN_URL", &url), ("CAIRN_TOKEN", &admin)],
    );
    let remote_env = printed_secret(code, &out, &err);
    assert_eq!(
        call(
            &s,
            Method::POST,
            "/v1/events",
            Auth::Bearer(&remote_env),
            one_event()
        )
        .status,
        201
    );
    assert!(listed(&list_tokens(&s), "remote-env")["types"].is_null());

    // Remote list: the tokens, never a secret.
    let (code, out, err) = common::cairn(&["token", "list", "--url", &url, "--token", &admin], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&x_id) && out.contains("remote-env"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(&x_id) && l.contains("read") && l.contains("a,b")),
        "{out}"
    );
    for t in [&x, &remote_env, &admin] {
        assert!(!out.contains(secret_part(t)), "a secret in the list: {out}");
    }

    // Remote, without the admin role: refused, nothing created.
    let (code, out, err) = common::cairn(
        &[
            "token", "create", "--role", "admin", "--name", "escalate", "--url", &url, "--token",
            &x,
        ],
        &[],
    );
    assert_ne!(code, 0, "a read token created a token: {out}");
    assert!(
        err.contains("403") || err.to_lowercase().contains("admin"),
        "{err}"
    );
    let (code, _, err) = common::cairn(&["token", "list", "--url", &url], &[]);
    assert_ne!(code, 0, "listing without a token succeeded");
    assert!(err.contains("401"), "{err}");
    assert!(!list_tokens(&s).iter().any(|r| r["name"] == "escalate"));

    // Offline while the server runs: refused, pointing to --url; nothing created.
    for args in [
        vec![
            "token", "create", "--role", "read", "--name", "y", "--data", &data_arg,
        ],
        vec!["token", "list", "--data", &data_arg],
        vec!["token", "revoke", &x_id, "--data", &data_arg],
    ] {
        let (code, out, err) = common::cairn(&args, &[]);
        assert_ne!(
            code, 0,
            "{args:?} succeeded on a data directory in use: {out}"
        );
        assert!(
            err.contains("--url"),
            "{args:?}: the error does not point to --url: {err}"
        );
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    assert!(!list_tokens(&s).iter().any(|r| r["name"] == "y"));
    assert_eq!(
        get(&s, "/v1/head", Auth::Bearer(&x)).status,
        200,
        "x survived the refused revoke"
    );

    // Remote revoke.
    let remote_env_id = listed(&list_tokens(&s), "remote-env")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (code, out, err) = common::cairn(
        &[
            "token",
            "revoke",
            &remote_env_id,
            "--url",
            &url,
            "--token",
            &admin,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty(), "{out}");
    assert_error(
        &get(&s, "/v1/head", Auth::Bearer(&remote_env)),
        401,
        "unauthorized",
        "after remote revoke",
    );
    let (code, _, err) = common::cairn(
        &[
            "token",
            "revoke",
            &remote_env_id,
            "--url",
            &url,
            "--token",
            &admin,
        ],
        &[],
    );
    assert_ne!(code, 0, "revoking twice succeeded");
    assert!(err.contains("404"), "{err}");

    // Offline, with the server stopped.
    assert!(s.terminate().success());
    let (code, out, err) = common::cairn(
        &[
            "token", "create", "--role", "ingest", "--name", "offline", "--types", "a,c", "--data",
            &data_arg,
        ],
        &[],
    );
    let offline = printed_secret(code, &out, &err);
    let (code, out, err) = common::cairn(
        &[
            "token",
            "create",
            "--role",
            "read",
            "--name",
            "offline-doomed",
            "--data",
            &data_arg,
        ],
        &[],
    );
    let offline_doomed = printed_secret(code, &out, &err);
    let (code, out, err) = common::cairn(&["token", "list", "--data", &data_arg], &[]);
    assert_eq!(code, 0, "{err}");
    for name in ["offline", "offline-doomed", "x", "admin"] {
        assert!(
            out.lines().any(|l| l.split('\t').any(|f| f == name)),
            "{name} not listed offline:\n{out}"
        );
    }
    assert!(
        out.lines()
            .any(|l| l.contains("offline") && l.contains("ingest") && l.contains("a,c")),
        "{out}"
    );
    assert!(
        !out.contains("remote-env"),
        "a revoked token is listed:\n{out}"
    );
    for t in [&x, &offline, &offline_doomed, &admin] {
        assert!(
            !out.contains(secret_part(t)),
            "a secret in the offline list:\n{out}"
        );
    }
    let doomed_id = out
        .lines()
        .find(|l| l.split('\t').any(|f| f == "offline-doomed"))
        .and_then(|l| l.split('\t').next())
        .expect("offline-doomed row")
        .to_string();
    let (code, _, err) = common::cairn(&["token", "revoke", &doomed_id, "--data", &data_arg], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = common::cairn(
        &["token", "revoke", "0123456789abcdef", "--data", &data_arg],
        &[],
    );
    assert_ne!(code, 0, "revoking an unknown id offline succeeded");
    // An invalid allow-list is refused offline too, and creates nothing.
    let (code, out, _) = common::cairn(
        &[
            "token",
            "create",
            "--role",
            "read",
            "--name",
            "bad-types",
            "--types",
            "a,bad type",
            "--data",
            &data_arg,
        ],
        &[],
    );
    assert_ne!(code, 0, "an invalid allow-list was accepted offline: {out}");

    // After a restart: the offline token works (with its allow-list), the offline
    // revocation holds, the remote token still works, the remote revocation holds.
    let s2 = Server::start_on(&data, &[]);
    assert_eq!(s2.token, admin);
    let r = call(
        &s2,
        Method::POST,
        "/v1/events",
        Auth::Bearer(&offline),
        Some(("application/json", json!({"type": "a"}).to_string())),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let r = call(
        &s2,
        Method::POST,
        "/v1/events",
        Auth::Bearer(&offline),
        Some(("application/json", json!({"type": "b"}).to_string())),
    );
    assert_error(&r, 403, "forbidden", "offline token's allow-list");
    assert_error(
        &get(&s2, "/v1/head", Auth::Bearer(&offline_doomed)),
        401,
        "unauthorized",
        "offline-revoked token",
    );
    assert_error(
        &get(&s2, "/v1/head", Auth::Bearer(&remote_env)),
        401,
        "unauthorized",
        "remote-revoked token",
    );
    assert_eq!(get(&s2, "/v1/head", Auth::Bearer(&x)).status, 200);
    let rows = list_tokens(&s2);
    assert!(
        !rows
            .iter()
            .any(|r| r["name"] == "offline-doomed" || r["name"] == "bad-types"),
        "{rows:?}"
    );
    let offline_id = listed(&rows, "offline")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(listed(&rows, "offline")["types"], json!(["a", "c"]));
    let url2 = format!("http://{}", s2.addr);
    let (code, out, err) =
        common::cairn(&["token", "list", "--url", &url2, "--token", &admin], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&offline_id), "{out}");
    let (code, _, err) = common::cairn(
        &[
            "token",
            "revoke",
            &offline_id,
            "--url",
            &url2,
            "--token",
            &admin,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_error(
        &get(&s2, "/v1/head", Auth::Bearer(&offline)),
        401,
        "unauthorized",
        "remote revoke of an offline token",
    );
    drop(s2);
    drop(s);
}

// ---------------------------------------------------------------------------------------
// restarts
// ---------------------------------------------------------------------------------------

#[test]
fn tokens_and_revocations_survive_restarts() {
    let mut s = Server::start(&[]);
    let log = append_mixed(&s);
    let (_, keeper) = create_token(&s, "read", "keeper", Some(&["audit", "agent.*"]));
    let (_, shipper) = create_token(&s, "ingest", "shipper", Some(&["agent.*"]));
    let (gone_id, gone) = create_token(&s, "read", "gone", None);
    assert_eq!(delete_token(&s, &gone_id).status, 204);
    let listed_before = list_tokens(&s);
    let data = s.data.clone();

    // A clean restart, then a crash (SIGKILL) right after a create and a revoke.
    assert!(s.terminate().success());
    let mut s2 = Server::start_on(&data, &[]);
    assert_eq!(
        list_tokens(&s2),
        listed_before,
        "the token list changed across a restart"
    );
    let r = get(
        &s2,
        "/v1/events?since=earliest&limit=1000",
        Auth::Bearer(&keeper),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        data_ids(&r.json),
        ids_where(&log, allowed),
        "the allow-list after a restart"
    );
    assert_error(
        &get(&s2, "/v1/verify", Auth::Bearer(&keeper)),
        403,
        "forbidden",
        "verify after restart",
    );
    assert_error(
        &get(&s2, "/v1/head", Auth::Bearer(&gone)),
        401,
        "unauthorized",
        "revoked before restart",
    );
    let r = append_as(&s2, Auth::Bearer(&shipper), &[json!({"type": "audit"})]);
    assert_error(&r, 403, "forbidden", "ingest allow-list after restart");

    let (_, late) = create_token(&s2, "ingest", "late", None);
    let keeper_id = listed(&list_tokens(&s2), "keeper")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(delete_token(&s2, &keeper_id).status, 204);
    s2.kill();
    let s3 = Server::start_on(&data, &[]);
    assert_eq!(
        append_as(&s3, Auth::Bearer(&late), &[json!({"type": "x"})]).status,
        201,
        "a token created before a crash"
    );
    assert_error(
        &get(&s3, "/v1/head", Auth::Bearer(&keeper)),
        401,
        "unauthorized",
        "revoked before a crash",
    );
    assert_error(
        &get(&s3, "/v1/head", Auth::Bearer(&gone)),
        401,
        "unauthorized",
        "revoked two restarts ago",
    );
    assert_eq!(
        append_as(&s3, Auth::Bearer(&shipper), &[json!({"type": "agent.ok"})]).status,
        201
    );
    let names: Vec<String> = list_tokens(&s3)
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for n in ["admin", "shipper", "late"] {
        assert!(names.iter().any(|x| x == n), "{n} missing: {names:?}");
    }
    drop(s3);
    drop(s);
}

/// Ids of events outside a token's allow-list must not leak, not even through the
/// `id:`-only frames that advance a filtered stream's cursor.
#[test]
fn allow_listed_stream_heartbeats_carry_no_foreign_ids() {
    let s = Server::start(&["--heartbeat", "1"]);
    let (status, created) = s.post(
        "/v1/tokens",
        "application/json",
        r#"{"role":"read","name":"auditor","types":["audit"]}"#,
    );
    assert_eq!(status, 201, "{created}");
    let token = created["data"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    let url = s.url(&format!("/v1/events/stream?token={token}"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    async fn read_until(
        body: &mut (impl Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
        text: &mut String,
        done: impl Fn(&str) -> bool,
    ) {
        while !done(text) {
            let piece = tokio::time::timeout(Duration::from_secs(10), body.next())
                .await
                .expect("a frame within 10 s")
                .expect("stream open")
                .expect("bytes");
            text.push_str(&String::from_utf8_lossy(&piece));
        }
    }

    let mut text = String::new();
    let mut body = rt.block_on(async {
        let response = reqwest::get(&url).await.expect("stream");
        assert_eq!(response.status(), 200);
        let mut body = Box::pin(response.bytes_stream());
        read_until(&mut body, &mut text, |t| t.contains("\n\n")).await;
        body
    });
    // Events the token may not see, while its stream is open.
    for i in 0..5 {
        let (status, _) = s.post_json(&json!({"type": "secret.op", "data": {"i": i}}));
        assert_eq!(status, 201);
    }
    rt.block_on(read_until(&mut body, &mut text, |t| {
        t.matches(": heartbeat").count() >= 2
    }));
    for line in s.export_lines() {
        let event: Value = serde_json::from_str(&line).expect("json");
        let id = event["id"].as_str().expect("id");
        assert!(!text.contains(id), "the stream leaked the id {id}:\n{text}");
    }
}
