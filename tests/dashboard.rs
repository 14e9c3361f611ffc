//! `GET /` (SPEC §2 "Operations"): the dashboard page, checked over plain HTTP against
//! the real binary. What the page does in a browser is in `tests/browser.rs`.
mod common;

use common::Server;
use serde_json::Value;

/// GET / with no token at all; returns status, content type, cache control and body.
fn get_page(s: &Server) -> (u16, String, String, String) {
    let r = s.http().get(s.url("/")).send().expect("GET /");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (ct, cc) = (header("content-type"), header("cache-control"));
    (r.status().as_u16(), ct, cc, r.text().expect("body"))
}

fn assert_page(s: &Server) -> String {
    let (status, content_type, cache_control, body) = get_page(s);
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert_eq!(cache_control, "no-cache");
    assert!(body.starts_with("<!doctype html>"), "not an HTML page");
    assert!(
        body.contains("EventSource"),
        "the page must use EventSource"
    );
    assert!(
        body.contains("/v1/events/stream"),
        "the page must open /v1/events/stream"
    );
    assert!(body.contains("/v1/verify"), "the page must call /v1/verify");
    body
}

#[test]
fn page_is_served_without_a_token_when_auth_is_on() {
    let s = Server::start(&[]);
    assert!(!s.token.is_empty(), "auth is on: an admin token exists");
    assert_page(&s);
    // A token does not change the answer (the page is public; the API is not).
    let r = s
        .http()
        .get(s.url("/"))
        .bearer_auth("cairn_not_a_real_token")
        .send()
        .expect("GET / with a bad token");
    assert_eq!(r.status().as_u16(), 200);
    // ...while the API it calls still needs one.
    let r = s
        .http()
        .get(s.url("/v1/head"))
        .send()
        .expect("GET /v1/head");
    assert_eq!(r.status().as_u16(), 401);
}

#[test]
fn page_is_served_with_auth_off() {
    let s = Server::start(&["--auth", "off"]);
    assert_page(&s);
    let r = s
        .http()
        .get(s.url("/v1/head"))
        .send()
        .expect("GET /v1/head");
    assert_eq!(
        r.status().as_u16(),
        200,
        "auth off: the page can run tokenless"
    );
}

#[test]
fn page_is_self_contained() {
    let s = Server::start(&[]);
    let body = assert_page(&s).to_ascii_lowercase();
    for needle in [
        "http://",
        "https://",
        "<script src",
        "<link",
        "@import",
        "src=",
        "href=",
        "url(\"",
        "url('",
    ] {
        assert!(
            !body.contains(needle),
            "the page must not reference anything outside itself: found {needle:?}"
        );
    }
    // Every <script> is inline, with no attribute that loads anything.
    for (i, _) in body.match_indices("<script") {
        let tag_end = body[i..].find('>').expect("closed tag") + i;
        let tag = &body[i..=tag_end];
        assert!(!tag.contains("src"), "external script: {tag}");
    }
    assert!(body.contains("<style>"), "the CSS is inline");
    assert!(
        body.contains("prefers-color-scheme: dark"),
        "dark mode is supported"
    );
}

#[test]
fn other_methods_on_the_page_are_405_json() {
    let s = Server::start(&[]);
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = s
            .http()
            .request(method.clone(), s.url("/"))
            .send()
            .expect("request");
        assert_eq!(r.status().as_u16(), 405, "{method} /");
        let allow = r
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let listed: Vec<&str> = allow.split(',').map(str::trim).collect();
        assert!(listed.contains(&"GET"), "{method} / names GET: {allow}");
        assert!(
            !listed.contains(&method.as_str()),
            "{method} / is not allowed: {allow}"
        );
        let body: Value = r.json().expect("405 body is JSON");
        assert_eq!(body["code"], "method_not_allowed", "{body}");
    }
    // HEAD is GET without a body (axum answers it for every GET route).
    let r = s.http().head(s.url("/")).send().expect("HEAD /");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
}

#[test]
fn unknown_paths_next_to_the_page_stay_404() {
    let s = Server::start(&[]);
    for path in ["/index.html", "/dashboard", "/web/index.html"] {
        let r = s.http().get(s.url(path)).send().expect("GET");
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }
}
