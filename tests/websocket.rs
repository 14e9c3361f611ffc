//! The WebSocket stream (SPEC §2 "WebSocket"), with a real client (tokio-tungstenite)
//! against the release binary on loopback:
//!
//! 1. exactly once under concurrent appends, across reconnects with `since` = the last
//!    id received (filtered and not, token in the header and in the query);
//! 2. `subscribe` changes the filter and the position (with and without `since`), also
//!    while events are appended; malformed commands get an error and change nothing;
//! 3. missing, wrong and revoked tokens close with 4003; an allow-list holds through
//!    every `subscribe`;
//! 4. what stays HTTP: the 503 over `--max-connections` (SSE and WebSocket together),
//!    a plain GET; a bad query string closes with 4000;
//! 5. pings at the heartbeat keep a reading client, a client that answers none is
//!    dropped, and SIGTERM closes with 1001.
//!
//! Received events are compared with `GET /v1/export` of the final log: same bytes, in
//! order, each once.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::Server;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const ZERO_ID: &str = "00000000000000000000000000";
const TYPES: [&str; 3] = ["kind.a", "kind.b.x", "other"];
/// A client still owed events receives none for this long: they were lost.
const STALL: Duration = Duration::from_secs(15);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    Header(&'a str),
    Query(&'a str),
    None,
}

/// What the server sent, as a client sees it.
#[derive(Debug)]
enum Msg {
    Connected(Value),
    /// An event's line, exactly as received.
    Event(String),
    Error(Value),
    /// A ping or a pong.
    Ping,
    /// The close code and reason, or `None` when the connection just ended.
    Closed(Option<(u16, String)>),
}

async fn connect(addr: &str, query: &str, auth: Auth<'_>) -> Result<Ws, tungstenite::Error> {
    let mut url = format!("ws://{addr}/v1/events/ws?{query}");
    if let Auth::Query(token) = auth {
        url.push_str(&format!("&token={token}"));
    }
    let mut request = url.into_client_request()?;
    if let Auth::Header(token) = auth {
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

async fn next_msg(ws: &mut Ws, timeout: Duration) -> Msg {
    let message = tokio::time::timeout(timeout, ws.next())
        .await
        .unwrap_or_else(|_| panic!("no message from the server for {timeout:?}"));
    match message {
        None | Some(Err(_)) => Msg::Closed(None),
        Some(Ok(Message::Close(frame))) => {
            Msg::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string())))
        }
        // Pongs answer this client's own pings.
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Msg::Ping,
        Some(Ok(Message::Text(text))) => {
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("a text message that is not JSON ({e}): {text}"));
            // Control messages never carry a `seq`; `connected` and `error` are reserved
            // event types, so no event can look like one.
            match (v["type"].as_str(), v.get("seq")) {
                (Some("connected"), None) => Msg::Connected(v),
                (Some("error"), None) => Msg::Error(v),
                _ => Msg::Event(text.to_string()),
            }
        }
        Some(Ok(other)) => panic!("unexpected message {other:?}"),
    }
}

/// The next message that is not a ping, within [`STALL`] (pings do not extend it).
async fn next_data(ws: &mut Ws) -> Msg {
    let deadline = Instant::now() + STALL;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_msg(ws, left).await {
            Msg::Ping => continue,
            other => return other,
        }
    }
}

async fn expect_connected(ws: &mut Ws) -> Value {
    match next_data(ws).await {
        Msg::Connected(v) => v,
        other => panic!("expected connected, got {other:?}"),
    }
}

async fn expect_event(ws: &mut Ws) -> String {
    match next_data(ws).await {
        Msg::Event(line) => line,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn expect_close(ws: &mut Ws) -> (u16, String) {
    match next_data(ws).await {
        Msg::Closed(Some(frame)) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    }
}

async fn subscribe(ws: &mut Ws, command: Value) {
    ws.send(Message::Text(command.to_string().into()))
        .await
        .expect("send subscribe");
}

fn id_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line).expect("event JSON");
    v["id"].as_str().expect("event id").to_string()
}

fn type_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line).expect("event JSON");
    v["type"].as_str().expect("event type").to_string()
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(s: &Server) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: format!("http://{}", s.addr),
            token: s.token.clone(),
        }
    }

    /// Appends events of these types; returns their ids.
    async fn append(&self, types: &[&str]) -> Vec<String> {
        let events: Vec<Value> = types
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"type": t, "source": "ws-test", "data": {"i": i, "t": t}}))
            .collect();
        let r = self
            .http
            .post(format!("{}/v1/events", self.base))
            .bearer_auth(&self.token)
            .json(&json!({ "events": events }))
            .send()
            .await
            .expect("append");
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.expect("ingest reply");
        v["data"]["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|id| id.as_str().expect("id").to_string())
            .collect()
    }

    /// The export lines for a query.
    async fn export(&self, query: &str) -> Vec<String> {
        let r = self
            .http
            .get(format!("{}/v1/export?{query}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("export");
        assert_eq!(r.status(), 200);
        let text = r.text().await.expect("export body");
        text.lines().map(str::to_string).collect()
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let r = request.send().await.expect("GET");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn open_streams(&self) -> u64 {
        self.get("/healthz", None).await.1["connections"]
            .as_u64()
            .expect("connections")
    }

    async fn wait_for_open_streams(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let open = self.open_streams().await;
            if open == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still {open} open streams after 30 s, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates a token; returns (id, secret).
    async fn create_token(&self, body: Value) -> (String, String) {
        let r = self
            .http
            .post(format!("{}/v1/tokens", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("create token");
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.expect("token reply");
        (
            v["data"]["id"].as_str().expect("id").to_string(),
            v["data"]["token"].as_str().expect("token").to_string(),
        )
    }
}

/// Appends `batches` groups of 1–40 events of rotating types as fast as the server takes
/// them; the final export is what every client must end up with.
async fn append_concurrently(api: &Api, batches: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..batches {
        let n = rng.random_range(1..=40);
        let types: Vec<&str> = (0..n)
            .map(|_| TYPES[rng.random_range(0..TYPES.len())])
            .collect();
        api.append(&types).await;
        if rng.random_bool(0.3) {
            // Let clients catch up now and then, so reconnects land both in the
            // replayed history and in the live tail.
            tokio::task::yield_now().await;
        }
    }
}

/// Panics with the first difference unless `got == expected`.
fn assert_same_lines(label: &str, got: &[String], expected: &[String]) {
    let mut seen = std::collections::HashSet::new();
    for line in got {
        assert!(seen.insert(id_of(line)), "{label}: duplicate event {line}");
    }
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g, e, "{label}: event {i} differs");
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "{label}: received {} events, the log has {}",
        got.len(),
        expected.len()
    );
}

/// A client that reads a random number of events, drops the connection (cleanly or
/// not) and reconnects with `since` = the last id it received, until it has the id in
/// `last` (set once appending is over; `None` = nothing matches).
async fn resume_until_done(
    addr: &str,
    filter: &str,
    auth: Auth<'_>,
    last: Arc<OnceLock<Option<String>>>,
    seed: u64,
) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut received: Vec<String> = Vec::new();
    let mut cursor = "earliest".to_string();
    let mut last_progress = Instant::now();
    loop {
        let mut ws = connect(addr, &format!("{filter}&since={cursor}"), auth)
            .await
            .expect("connect");
        let connected = expect_connected(&mut ws).await;
        let expected_cursor = if cursor == "earliest" {
            ZERO_ID
        } else {
            &cursor
        };
        assert_eq!(connected["cursor"], expected_cursor, "{connected}");
        let quota = rng.random_range(1..250);
        let mut taken = 0;
        while taken < quota {
            if let Some(target) = last.get()
                && received.last().map(|l| id_of(l)) == *target
            {
                return received;
            }
            // Pings (every second) wake the client up to check whether it is done.
            match next_msg(&mut ws, STALL).await {
                Msg::Event(line) => {
                    received.push(line);
                    taken += 1;
                    last_progress = Instant::now();
                }
                Msg::Ping => assert!(
                    last_progress.elapsed() < STALL || last.get().is_none(),
                    "{filter}: no event for {STALL:?} while still owed some"
                ),
                other => panic!("{filter}: unexpected {other:?}"),
            }
        }
        if let Some(line) = received.last() {
            cursor = id_of(line);
        }
        if rng.random_bool(0.5) {
            let _ = ws.close(None).await;
        }
    }
}

#[test]
fn exactly_once_under_concurrent_appends_across_reconnects_with_since() {
    let s = Server::start(&["--heartbeat", "1"]);
    let api = Api::new(&s);
    runtime().block_on(async {
        // Some history first, so the first connections replay before going live.
        append_concurrently(&api, 20, 1).await;
        let all_done = Arc::new(OnceLock::new());
        let filtered_done = Arc::new(OnceLock::new());
        let all = tokio::spawn({
            let (addr, token, done) = (s.addr.clone(), s.token.clone(), all_done.clone());
            async move { resume_until_done(&addr, "", Auth::Header(&token), done, 7).await }
        });
        let filtered = tokio::spawn({
            let (addr, token, done) = (s.addr.clone(), s.token.clone(), filtered_done.clone());
            async move {
                resume_until_done(&addr, "types=kind.a,kind.b*", Auth::Query(&token), done, 8).await
            }
        });
        append_concurrently(&api, 150, 2).await;
        let expected_all = api.export("since=earliest").await;
        let expected_filtered = api.export("since=earliest&types=kind.a,kind.b*").await;
        assert!(expected_all.len() > expected_filtered.len());
        all_done
            .set(expected_all.last().map(|l| id_of(l)))
            .expect("set once");
        filtered_done
            .set(expected_filtered.last().map(|l| id_of(l)))
            .expect("set once");
        let got_all = all.await.expect("client task");
        let got_filtered = filtered.await.expect("client task");
        assert_same_lines("all types", &got_all, &expected_all);
        assert_same_lines("kind.a,kind.b*", &got_filtered, &expected_filtered);
    });
}

#[test]
fn subscribe_replaces_the_filter_and_the_position() {
    let s = Server::start(&[]);
    let api = Api::new(&s);
    runtime().block_on(async {
        let ids = api.append(&["kind.a", "other", "kind.a", "other"]).await;
        let (a1, b1, a2, b2) = (&ids[0], &ids[1], &ids[2], &ids[3]);
        let mut ws = connect(
            &s.addr,
            "types=kind.a&since=earliest",
            Auth::Header(&s.token),
        )
        .await
        .expect("connect");
        let connected = expect_connected(&mut ws).await;
        assert_eq!(connected["cursor"], ZERO_ID);
        assert_eq!(connected["head"]["id"], *b2);
        assert_eq!(id_of(&expect_event(&mut ws).await), *a1);
        assert_eq!(id_of(&expect_event(&mut ws).await), *a2);

        // No `since`: delivery continues after the last event sent (a2), now for `other`.
        subscribe(
            &mut ws,
            json!({"action": "subscribe", "event_types": ["other"]}),
        )
        .await;
        let connected = expect_connected(&mut ws).await;
        assert_eq!(connected["cursor"], *a2, "{connected}");
        assert_eq!(id_of(&expect_event(&mut ws).await), *b2);
        // Live events follow the new filter: a3 is skipped, b3 arrives.
        let live = api.append(&["kind.a", "other"]).await;
        let (a3, b3) = (&live[0], &live[1]);
        assert_eq!(id_of(&expect_event(&mut ws).await), *b3);

        // `since` and no `event_types`: everything after the cursor, all types.
        subscribe(&mut ws, json!({"action": "subscribe", "since": "earliest"})).await;
        assert_eq!(expect_connected(&mut ws).await["cursor"], ZERO_ID);
        let everything = api.export("since=earliest").await;
        for line in &everything {
            assert_eq!(&expect_event(&mut ws).await, line);
        }

        // A prefix pattern from an id in the middle.
        subscribe(
            &mut ws,
            json!({"action": "subscribe", "event_types": ["kind.*"], "since": b1}),
        )
        .await;
        assert_eq!(expect_connected(&mut ws).await["cursor"], *b1);
        assert_eq!(id_of(&expect_event(&mut ws).await), *a2);
        assert_eq!(id_of(&expect_event(&mut ws).await), *a3);

        // Two subscribes back to back: the second, without `since`, continues after the
        // first one's position (nothing was delivered in between, or what was).
        subscribe(
            &mut ws,
            json!({"action": "subscribe", "event_types": ["other"], "since": a1}),
        )
        .await;
        subscribe(
            &mut ws,
            json!({"action": "subscribe", "event_types": ["kind.*"]}),
        )
        .await;
        assert_eq!(expect_connected(&mut ws).await["cursor"], *a1);
        let mut between = Vec::new();
        let second = loop {
            match next_data(&mut ws).await {
                Msg::Event(line) => between.push(id_of(&line)),
                Msg::Connected(c) => break c,
                other => panic!("expected events or connected, got {other:?}"),
            }
        };
        let continues_after = between.last().unwrap_or(a1).clone();
        assert_eq!(second["cursor"], continues_after, "{second}");
        // Usually nothing was sent in between: then a2 and a3 follow.
        for line in api
            .export(&format!("since={continues_after}&types=kind.*"))
            .await
        {
            assert_eq!(expect_event(&mut ws).await, line);
        }

        // Malformed commands: an error each; the connection, filter and position stay.
        let bad: Vec<(Message, &str)> = vec![
            (Message::Text("not json".into()), "bad_request"),
            (
                Message::Text(r#"{"action":"unsubscribe"}"#.into()),
                "bad_request",
            ),
            (
                Message::Text(r#"{"action":"subscribe","types":["kind.a"]}"#.into()),
                "bad_request",
            ),
            (
                Message::Text(r#"{"action":"subscribe","event_types":[]}"#.into()),
                "bad_request",
            ),
            (
                Message::Text(r#"{"action":"subscribe","event_types":["bad type"]}"#.into()),
                "bad_request",
            ),
            (
                Message::Text(r#"{"action":"subscribe","since":"yesterday"}"#.into()),
                "bad_request",
            ),
            (Message::Binary(vec![1, 2, 3].into()), "bad_request"),
        ];
        for (message, code) in bad {
            let shown = format!("{message:?}");
            ws.send(message).await.expect("send");
            match next_data(&mut ws).await {
                Msg::Error(e) => {
                    assert_eq!(e["code"], code, "{shown}: {e}");
                    assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
                }
                other => panic!("{shown}: expected an error message, got {other:?}"),
            }
        }
        let more = api.append(&["other", "kind.a"]).await;
        assert_eq!(
            id_of(&expect_event(&mut ws).await),
            more[1],
            "the filter kind.* still holds after the errors"
        );
    });
}

/// One subscription window: the cursor and filter of a `connected`, and what followed.
struct Segment {
    cursor: String,
    types: Option<&'static str>,
    events: Vec<String>,
}

#[test]
fn subscribe_under_concurrent_appends_is_exactly_once_from_each_new_position() {
    let s = Server::start(&["--heartbeat", "1"]);
    let api = Api::new(&s);
    runtime().block_on(async {
        append_concurrently(&api, 10, 3).await;
        let done: Arc<OnceLock<Option<String>>> = Arc::new(OnceLock::new());
        let client = tokio::spawn({
            let (addr, token, done) = (s.addr.clone(), s.token.clone(), done.clone());
            async move { resubscribing_client(&addr, &token, done).await }
        });
        append_concurrently(&api, 120, 4).await;
        let total = api.export("since=earliest").await;
        done.set(total.last().map(|l| id_of(l))).expect("set once");
        let segments = client.await.expect("client task");
        assert_eq!(segments.len(), RESUBSCRIBES + 1);
        for (i, segment) in segments.iter().enumerate() {
            let mut query = format!("since={}", segment.cursor);
            if let Some(t) = segment.types {
                query.push_str(&format!("&types={t}"));
            }
            let expected = api.export(&query).await;
            let label = format!("segment {i} ({query})");
            if i == RESUBSCRIBES {
                assert_same_lines(&label, &segment.events, &expected);
            } else {
                // Cut short by the next subscribe: a prefix of its position's log.
                let end = segment.events.len().min(expected.len());
                assert_same_lines(&label, &segment.events, &expected[..end]);
            }
        }
    });
}

const RESUBSCRIBES: usize = 12;

/// Reads a while, re-subscribes with a random filter and position, [`RESUBSCRIBES`]
/// times; the last subscribe takes every type, and the client reads until the id in
/// `done`. Returns what each subscription delivered.
async fn resubscribing_client(
    addr: &str,
    token: &str,
    done: Arc<OnceLock<Option<String>>>,
) -> Vec<Segment> {
    const FILTERS: [Option<&str>; 3] = [None, Some("kind.a,kind.b*"), Some("other")];
    let mut rng = StdRng::seed_from_u64(11);
    let mut ws = connect(addr, "since=earliest", Auth::Header(token))
        .await
        .expect("connect");
    let cursor = expect_connected(&mut ws).await["cursor"].clone();
    let mut segments = vec![Segment {
        cursor: cursor.as_str().expect("cursor").to_string(),
        types: None,
        events: Vec::new(),
    }];
    let mut seen: Vec<String> = Vec::new();
    for round in 0..RESUBSCRIBES {
        let quota = rng.random_range(1..150);
        let mut taken = 0;
        let mut last_progress = Instant::now();
        // Pings (every second) wake the client up to check whether appending is over.
        while taken < quota && done.get().is_none() {
            match next_msg(&mut ws, STALL).await {
                Msg::Event(line) => {
                    seen.push(id_of(&line));
                    segments.last_mut().expect("segment").events.push(line);
                    taken += 1;
                    last_progress = Instant::now();
                }
                Msg::Ping => assert!(
                    last_progress.elapsed() < STALL,
                    "no event for {STALL:?} while appending"
                ),
                other => panic!("unexpected {other:?}"),
            }
        }
        let types = if round + 1 == RESUBSCRIBES {
            None
        } else {
            FILTERS[rng.random_range(0..FILTERS.len())]
        };
        let mut command = json!({"action": "subscribe"});
        if let Some(t) = types {
            command["event_types"] = json!(t.split(',').collect::<Vec<_>>());
        }
        let since = (!seen.is_empty() && rng.random_bool(0.6))
            .then(|| seen[rng.random_range(0..seen.len())].clone());
        if let Some(id) = &since {
            command["since"] = json!(id);
        }
        subscribe(&mut ws, command).await;
        // Events of the old subscription may still arrive before `connected`.
        let connected = loop {
            match next_data(&mut ws).await {
                Msg::Event(line) => {
                    seen.push(id_of(&line));
                    segments.last_mut().expect("segment").events.push(line);
                }
                Msg::Connected(c) => break c,
                other => panic!("unexpected {other:?}"),
            }
        };
        let cursor = connected["cursor"].as_str().expect("cursor").to_string();
        match &since {
            Some(id) => assert_eq!(&cursor, id),
            // Without `since`: after the last event delivered (or where it started).
            None => {
                let previous = &segments.last().expect("segment");
                let expected = previous
                    .events
                    .last()
                    .map_or(previous.cursor.clone(), |l| id_of(l));
                assert_eq!(cursor, expected);
            }
        }
        segments.push(Segment {
            cursor,
            types,
            events: Vec::new(),
        });
    }
    // The last subscription takes every type: it ends at the log's last event.
    let mut last_progress = Instant::now();
    loop {
        let segment = segments.last_mut().expect("segment");
        if let Some(target) = done.get()
            && segment.events.last().map(|l| id_of(l)) == *target
        {
            return segments;
        }
        match next_msg(&mut ws, STALL).await {
            Msg::Event(line) => {
                segment.events.push(line);
                last_progress = Instant::now();
            }
            // Pings (every second) wake the client up to check whether it is done.
            Msg::Ping => assert!(last_progress.elapsed() < STALL, "no event for {STALL:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Connects and expects to be refused with a close frame (after at most an error
/// message), never a `connected` or an event.
async fn expect_refused(addr: &str, query: &str, auth: Auth<'_>) -> (u16, String) {
    let mut ws = connect(addr, query, auth).await.expect("handshake");
    loop {
        match next_data(&mut ws).await {
            Msg::Error(_) => continue,
            Msg::Closed(Some(frame)) => return frame,
            other => panic!("{query}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn bad_missing_and_revoked_tokens_close_with_4003_and_allow_lists_hold() {
    let s = Server::start(&[]);
    let api = Api::new(&s);
    runtime().block_on(async {
        api.append(&["kind.a", "other", "kind.a"]).await;
        for (label, auth) in [
            ("no token", Auth::None),
            ("unknown token (header)", Auth::Header("cairn_nope_nope")),
            ("unknown token (query)", Auth::Query("cairn_nope_nope")),
        ] {
            let (code, reason) = expect_refused(&s.addr, "since=earliest", auth).await;
            assert_eq!(code, 4003, "{label}: {reason}");
            assert!(
                !reason.is_empty(),
                "{label}: the close frame names the reason"
            );
        }

        // A read token that may see kind.a only.
        let (id, token) = api
            .create_token(json!({"role": "read", "name": "ws", "types": ["kind.a"]}))
            .await;
        let allowed = api.export("since=earliest&types=kind.a").await;
        assert_eq!(allowed.len(), 2);
        let mut ws = connect(&s.addr, "since=earliest", Auth::Query(&token))
            .await
            .expect("connect");
        expect_connected(&mut ws).await;
        for line in &allowed {
            assert_eq!(&expect_event(&mut ws).await, line);
        }
        // Asking for more types gets the intersection: `other` never arrives, neither
        // replayed nor live (it is appended before the kind.a that does arrive).
        subscribe(
            &mut ws,
            json!({"action": "subscribe", "event_types": ["other", "kind.*"], "since": "earliest"}),
        )
        .await;
        expect_connected(&mut ws).await;
        for line in &allowed {
            assert_eq!(&expect_event(&mut ws).await, line);
        }
        let live = api.append(&["other", "kind.a"]).await;
        let line = expect_event(&mut ws).await;
        assert_eq!(
            (id_of(&line), type_of(&line)),
            (live[1].clone(), "kind.a".into())
        );

        // Revocation closes the open connection with 4003, and the token is refused after.
        let r = api
            .http
            .delete(format!("{}/v1/tokens/{id}", api.base))
            .bearer_auth(&api.token)
            .send()
            .await
            .expect("revoke");
        assert_eq!(r.status(), 204);
        let (code, reason) = expect_close(&mut ws).await;
        assert_eq!(code, 4003, "{reason}");
        let (code, _) = expect_refused(&s.addr, "", Auth::Header(&token)).await;
        assert_eq!(code, 4003);
        api.wait_for_open_streams(0).await;
    });
}

#[test]
fn the_connection_limit_is_shared_with_sse_and_other_refusals_are_clear() {
    let s = Server::start(&["--max-connections", "2"]);
    let api = Api::new(&s);
    runtime().block_on(async {
        // One SSE stream and one WebSocket take both slots.
        let sse = api
            .http
            .get(format!("{}/v1/events/stream", api.base))
            .bearer_auth(&api.token)
            .send()
            .await
            .expect("SSE stream");
        assert_eq!(sse.status(), 200);
        let mut ws = connect(&s.addr, "", Auth::Header(&s.token))
            .await
            .expect("connect");
        expect_connected(&mut ws).await;
        api.wait_for_open_streams(2).await;
        match connect(&s.addr, "", Auth::Header(&s.token)).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
                assert!(response.headers().contains_key("retry-after"));
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .expect("JSON error body");
                assert_eq!(body["code"], "too_many_connections");
            }
            other => panic!("expected a 503, got {other:?}"),
        }
        // Closing the SSE stream frees its slot for a WebSocket.
        drop(sse);
        api.wait_for_open_streams(1).await;
        let mut second = connect(&s.addr, "", Auth::Header(&s.token))
            .await
            .expect("connect after a slot was freed");
        expect_connected(&mut second).await;

        // A query string that cannot be served: an error message, then close 4000.
        for query in ["since=yesterday", "types=bad%20type", "until=earliest"] {
            let mut ws = connect(&s.addr, query, Auth::Header(&s.token))
                .await
                .expect("handshake");
            match next_data(&mut ws).await {
                Msg::Error(e) => assert_eq!(e["code"], "bad_request", "{query}: {e}"),
                other => panic!("{query}: expected an error message, got {other:?}"),
            }
            let (code, reason) = expect_close(&mut ws).await;
            assert_eq!(code, 4000, "{query}: {reason}");
        }

        // A message over 64 KiB cannot be read: close 1009 (message too big).
        drop(ws);
        api.wait_for_open_streams(1).await;
        let mut big = connect(&s.addr, "", Auth::Header(&s.token))
            .await
            .expect("connect");
        expect_connected(&mut big).await;
        let huge = json!({"action": "subscribe", "event_types": ["x".repeat(100 * 1024)]});
        subscribe(&mut big, huge).await;
        let (code, reason) = expect_close(&mut big).await;
        assert_eq!(code, 1009, "{reason}");
        api.wait_for_open_streams(1).await;

        // Not a WebSocket handshake: an ordinary HTTP error (401 first without a token).
        let r = api
            .http
            .head(format!("{}/v1/events/ws", api.base))
            .bearer_auth(&api.token)
            .send()
            .await
            .expect("HEAD");
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "GET");
        let (status, body) = api.get("/v1/events/ws", Some(&s.token)).await;
        assert!((400..500).contains(&status), "{status} {body}");
        assert_eq!(body["code"], "websocket_required", "{body}");
        let (status, body) = api.get("/v1/events/ws", None).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(api.open_streams().await, 1);
        drop(second);
    });
}

#[test]
fn pings_keep_a_reading_client_and_a_silent_one_is_dropped_then_sigterm_closes_1001() {
    let mut s = Server::start(&["--heartbeat", "1", "--write-timeout", "2"]);
    let api = Api::new(&s);
    runtime().block_on(async {
        let mut ws = connect(&s.addr, "", Auth::Header(&s.token))
            .await
            .expect("connect");
        expect_connected(&mut ws).await;
        // A client that completes the handshake and then never reads nor answers.
        let mut silent = TcpStream::connect(&s.addr).await.expect("connect");
        let handshake = format!(
            "GET /v1/events/ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Authorization: Bearer {}\r\n\r\n",
            s.addr, s.token
        );
        silent.write_all(handshake.as_bytes()).await.expect("send");
        let mut head = [0u8; 12];
        silent.read_exact(&mut head).await.expect("read");
        assert_eq!(&head, b"HTTP/1.1 101");
        api.wait_for_open_streams(2).await;

        // Pings every second; a client that answers them (tungstenite does, as it reads)
        // outlives --write-timeout (2 s) many times over, the silent one does not.
        let mut pings = 0;
        while pings < 6 {
            match next_msg(&mut ws, STALL).await {
                Msg::Ping => pings += 1,
                other => panic!("expected pings, got {other:?}"),
            }
        }
        api.wait_for_open_streams(1).await;
        drop(silent);

        // SIGTERM: the open WebSocket is closed with 1001 and the server exits 0.
        let exited = tokio::task::spawn_blocking(move || {
            let status = s.terminate();
            (status, s)
        });
        let (code, reason) = expect_close(&mut ws).await;
        assert_eq!(code, 1001, "{reason}");
        let (status, _s) = exited.await.expect("terminate");
        assert!(status.success(), "{status:?}");
    });
}

/// The server's thread count, from /proc.
fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads")
}

#[test]
fn frames_arriving_during_a_replay_keep_one_store_read_in_flight() {
    let s = Server::start(&[]);
    let api = Api::new(&s);
    // 50,000 events: a subscribe to a type that matches none scans 16,000 of them per
    // store read, so each read takes a while.
    let pad = "p".repeat(200);
    for chunk in 0..5 {
        let body: String = (0..10_000)
            .map(|i| {
                json!({"type": "kind.a", "data": {"c": chunk, "i": i, "pad": pad}}).to_string()
                    + "\n"
            })
            .collect();
        let (status, reply) = s.post("/v1/events", "application/x-ndjson", body);
        assert_eq!(status, 201, "{reply}");
    }
    let pid = s.pid();
    runtime().block_on(async {
        let ws = connect(&s.addr, "", Auth::Header(&s.token))
            .await
            .expect("connect");
        let (mut sink, mut stream) = ws.split();
        let baseline = threads(pid);
        let sampling = thread_sampler(pid);
        // A frame every millisecond, each landing while a store read is in flight; every
        // tenth restarts the replay so that there always is one.
        let frames = 1_500;
        let subscribes = frames / 10;
        let sender = tokio::spawn(async move {
            let restart =
                json!({"action": "subscribe", "event_types": ["nomatch"], "since": "earliest"});
            for i in 0..frames {
                let frame = if i % 10 == 0 {
                    Message::Text(restart.to_string().into())
                } else {
                    Message::Ping(vec![].into())
                };
                sink.send(frame).await.expect("send");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sink
        });
        let mut connected = 0;
        while connected < subscribes + 1 {
            match tokio::time::timeout(STALL, stream.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let v: Value = serde_json::from_str(&text).expect("JSON");
                    assert_eq!(v["type"], "connected", "{v}");
                    connected += 1;
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let sink = sender.await.expect("sender");
        let peak = sampling.stop().await;
        // An abandoned read used to stay in flight beside the next one, each on a
        // blocking-pool thread of its own (the pool grows to 512).
        println!("threads: {baseline} before, {peak} at the peak");
        assert!(
            peak <= baseline + 8,
            "threads went from {baseline} to {peak} during the flood"
        );
        // Then everything, once, in order.
        let mut ws = sink.reunite(stream).expect("reunite");
        subscribe(&mut ws, json!({"action": "subscribe", "since": "earliest"})).await;
        expect_connected(&mut ws).await;
        let expected = api.export("since=earliest").await;
        assert_eq!(expected.len(), 50_000);
        for line in &expected {
            assert_eq!(&expect_event(&mut ws).await, line);
        }
    });
}

/// Samples a process's thread count every 2 ms until stopped; returns the peak.
struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Sampler {
    async fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("sampler")
    }
}

fn thread_sampler(pid: u32) -> Sampler {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = tokio::task::spawn_blocking({
        let stop = stop.clone();
        move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(threads(pid));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        }
    });
    Sampler { stop, task }
}

/// One metric's value from `GET /metrics` (0 when absent).
async fn metric(api: &Api, name: &str) -> f64 {
    let text = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_websocket_that_falls_behind_the_live_buffer_reads_the_log_and_counts_in_metrics() {
    let s = Server::start(&["--sync", "none"]);
    let api = Api::new(&s);
    runtime().block_on(async {
        let mut ws = connect(&s.addr, "", Auth::Header(&s.token))
            .await
            .expect("connect");
        expect_connected(&mut ws).await;
        assert_eq!(metric(&api, "cairn_streams_open").await, 1.0);
        // The client reads nothing while ~16 MB go by (more than the socket buffers
        // hold, so the server's writer for it blocks), then 9,000 small single appends.
        // Each append is a broadcast message of its own unless the publisher, running
        // late on a loaded machine, merges a few queued ones: 9,000 leaves room for that
        // and still passes the live buffer's 4,096.
        let pad = "p".repeat(8_000);
        for i in 0..11_000 {
            let data = if i < 2_000 {
                json!({"i": i, "pad": pad})
            } else {
                json!({"i": i})
            };
            let r = api
                .http
                .post(format!("{}/v1/events", api.base))
                .bearer_auth(&api.token)
                .json(&json!({"type": "kind.a", "data": data}))
                .send()
                .await
                .expect("append");
            assert_eq!(r.status(), 201);
        }
        let expected = api.export("since=earliest").await;
        for line in &expected {
            assert_eq!(&expect_event(&mut ws).await, line);
        }
        assert!(metric(&api, "cairn_stream_catchup_total").await >= 1.0);
        assert!(metric(&api, "cairn_events_delivered_total").await >= 11_000.0);
    });
}
