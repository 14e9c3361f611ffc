mod common;
use common::Server;
use serde_json::json;

#[test]
fn ingest_then_read_back() {
    let s = Server::start(&[]);
    let (status, body) = s.post_json(&json!({"type": "tool_call", "data": {"b": 1, "a": 2}}));
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["first_seq"], 1);
    let lines = s.export_lines();
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with(r#"{"data":{"a":2,"b":1},"hash":""#),
        "{}",
        lines[0]
    );
}
