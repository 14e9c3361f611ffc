//! SPEC §5: a client that shuts down its sending side after a complete request (a TCP
//! half-close, as `nc -N` does) still gets the full response: a normal one, an error, and
//! a stream that keeps going. A body cut short by the half-close is a 400, and a stream
//! client that has really gone is still noticed at once, not at the next heartbeat.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::{Server, wait_until};

/// Sends `request`, shuts down the sending side, and reads until the server closes the
/// connection (or `until` is found in what arrived, for a stream that does not end).
fn half_closed_exchange(addr: &str, request: &[u8], until: Option<&str>) -> String {
    let mut socket = TcpStream::connect(addr).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    socket.write_all(request).expect("send the request");
    socket.shutdown(Shutdown::Write).expect("half-close");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut received = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match socket.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading the response: {e}"),
        }
        let text = String::from_utf8_lossy(&received);
        if until.is_some_and(|needle| text.contains(needle)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no complete response within 10 s; got {text:?}"
        );
    }
    String::from_utf8_lossy(&received).into_owned()
}

fn get(path: &str, authorization: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: cairn\r\nAuthorization: {authorization}\r\n\r\n")
        .into_bytes()
}

#[test]
fn a_half_closed_client_gets_normal_and_error_responses() {
    let s = Server::start(&[]);
    let (status, _) = s.post_json(&serde_json::json!({"type": "a"}));
    assert_eq!(status, 201);

    let ok = half_closed_exchange(
        &s.addr,
        &get("/v1/head", &format!("Bearer {}", s.token)),
        None,
    );
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains(r#""seq":1"#), "the whole body arrives: {ok}");

    for authorization in [
        "Bearer nope",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "bearer cairn_00_x",
        "Bearer cairn_0123456789abcdef_0123456789abcdef",
        "Token abc",
        "Bearer a b",
        "Bearer\ttab",
        "",
    ] {
        let reply = half_closed_exchange(&s.addr, &get("/v1/head", authorization), None);
        assert!(
            reply.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
            "Authorization {authorization:?}: {reply:?}"
        );
        assert!(
            reply.ends_with(r#""code":"unauthorized"}"#),
            "the whole error body arrives: {reply}"
        );
    }

    // An append whose body is complete is answered; one cut short is refused.
    let body = r#"{"type":"half.closed"}"#;
    let append = |length: usize| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: cairn\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{body}",
            s.token
        )
        .into_bytes()
    };
    let created = half_closed_exchange(&s.addr, &append(body.len()), None);
    assert!(created.starts_with("HTTP/1.1 201 Created\r\n"), "{created}");
    assert!(created.contains(r#""last_seq":2"#), "{created}");
    let cut = half_closed_exchange(&s.addr, &append(body.len() + 10), None);
    assert!(cut.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{cut}");
    assert!(cut.contains("before the request body ended"), "{cut}");
    assert_eq!(s.head()["seq"], 2, "the cut request appended nothing");
}

#[test]
fn a_gone_stream_is_let_go_and_a_half_closed_one_keeps_delivering() {
    let s = Server::start(&[]);
    let (status, _) = s.post_json(&serde_json::json!({"type": "before"}));
    assert_eq!(status, 201);

    // A stream client that closes for good frees its slot long before the next
    // heartbeat (15 s by default): the server probes as soon as the client's FIN arrives.
    let mut gone = TcpStream::connect(&s.addr).expect("connect");
    gone.write_all(&get("/v1/events/stream", &format!("Bearer {}", s.token)))
        .expect("request");
    // Read all that was sent (unread data would make the close a reset, not a FIN).
    gone.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&received).contains("event: connected\ndata: ")
        || !received.ends_with(b"\n\n\r\n")
    {
        assert!(
            Instant::now() < deadline,
            "no connected frame: {received:?}"
        );
        if let Ok(n) = gone.read(&mut chunk) {
            received.extend_from_slice(&chunk[..n]);
        }
    }
    assert!(received.starts_with(b"HTTP/1.1 200 OK"), "{received:?}");
    wait_until(Duration::from_secs(10), "one open stream", || {
        s.get("/healthz").1["connections"] == 1
    });
    drop(gone);
    wait_until(
        Duration::from_secs(5),
        "the closed stream to be let go before its heartbeat",
        || s.get("/healthz").1["connections"] == 0,
    );

    // A half-closed SSE client: the history, then an event appended afterwards, live.
    // (Once half-closed, its full close later is noticed by a failed write, as before.)
    let token = s.token.clone();
    let addr = s.addr.clone();
    let reader = std::thread::spawn(move || {
        half_closed_exchange(
            &addr,
            &get(
                "/v1/events/stream?since=earliest",
                &format!("Bearer {token}"),
            ),
            Some("event: after"),
        )
    });
    wait_until(Duration::from_secs(10), "the stream to open", || {
        s.get("/healthz").1["connections"] == 1
    });
    let (status, _) = s.post_json(&serde_json::json!({"type": "after"}));
    assert_eq!(status, 201);
    let streamed = reader.join().expect("reader");
    assert!(streamed.contains("event: connected"), "{streamed}");
    assert!(streamed.contains("event: before"), "{streamed}");
    assert!(streamed.contains("event: after"), "{streamed}");
}

/// After the upgrade, end-of-file is the WebSocket's to see: a client that drops its
/// connection without a close frame frees its slot at once, not at the next ping.
#[test]
fn a_websocket_that_drops_its_connection_is_let_go_at_once() {
    let s = Server::start(&[]);
    let mut socket = TcpStream::connect(&s.addr).expect("connect");
    socket
        .write_all(
            format!(
                "GET /v1/events/ws HTTP/1.1\r\nHost: cairn\r\nAuthorization: Bearer {}\r\n\
                 Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                s.token
            )
            .as_bytes(),
        )
        .expect("handshake");
    // Everything the server sent is read first: closing with unread data would send a
    // reset, which every reader notices; a plain FIN is what must not be held back.
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&received).contains("\"connected\"") {
        assert!(
            Instant::now() < deadline,
            "no connected message: {received:?}"
        );
        if let Ok(n) = socket.read(&mut chunk) {
            received.extend_from_slice(&chunk[..n]);
        }
    }
    assert!(received.starts_with(b"HTTP/1.1 101"), "{received:?}");
    wait_until(Duration::from_secs(10), "one open stream", || {
        s.get("/healthz").1["connections"] == 1
    });
    drop(socket);
    wait_until(
        Duration::from_secs(5),
        "the dropped WebSocket to be let go before its first ping (15 s)",
        || s.get("/healthz").1["connections"] == 0,
    );
}
