//! Query paging with `next` (SPEC §2): pages never skip or repeat an event, also while
//! events are appended, in both orders, with type, source and time filters; `next` is
//! null exactly when a page reached the end of its range.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Server, wait_until};
use serde_json::{Value, json};
use ulid::Ulid;

const LIMIT: usize = 7;
/// The background appender stops after this many requests once every pager has seen
/// the log grow (and, as a safety bound, after four times as many in any case).
const APPEND_REQUESTS: u64 = 1500;
const MAX_APPEND_REQUESTS: u64 = 4 * APPEND_REQUESTS;
/// Most events the log can hold in the concurrent test.
const MAX_EVENTS: u64 = PREFILL as u64 + MAX_APPEND_REQUESTS * 3;
const PREFILL: usize = 150;

const TYPES: [&str; 5] = [
    "alpha",
    "agent.created",
    "agent.deleted",
    "beta.x",
    "alphabet",
];
const SOURCES: [Option<&str>; 4] = [Some("s1"), Some("s2"), None, Some("S1")];

fn event_value(n: u64) -> Value {
    let mut e = json!({"type": TYPES[(n % 5) as usize], "data": {"n": n}});
    if let Some(s) = SOURCES[(n % 4) as usize] {
        e["source"] = json!(s);
    }
    e
}

/// An event of the log as the export shows it.
#[derive(Debug, Clone)]
struct Ev {
    id: String,
    ulid: Ulid,
    seq: u64,
    ty: String,
    source: Option<String>,
    value: Value,
}

fn parse_event(v: &Value) -> Ev {
    let id = v["id"].as_str().expect("id").to_string();
    Ev {
        ulid: Ulid::from_string(&id).expect("ULID"),
        id,
        seq: v["seq"].as_u64().expect("seq"),
        ty: v["type"].as_str().expect("type").to_string(),
        source: v["source"].as_str().map(str::to_string),
        value: v.clone(),
    }
}

fn export(s: &Server) -> Vec<Ev> {
    s.export_lines()
        .iter()
        .map(|l| parse_event(&serde_json::from_str(l).expect("export line is JSON")))
        .collect()
}

fn head_seq(s: &Server) -> u64 {
    s.head()["seq"].as_u64().expect("head seq")
}

/// RFC 3339 with milliseconds at a UTC offset of `offset_minutes`.
fn rfc3339(ms: u64, offset_minutes: i32) -> String {
    let utc = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .expect("time in range");
    let t =
        utc.to_offset(time::UtcOffset::from_whole_seconds(offset_minutes * 60).expect("offset"));
    let offset = if offset_minutes == 0 {
        "Z".to_string()
    } else {
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let m = offset_minutes.abs();
        format!("{sign}{:02}:{:02}", m / 60, m % 60)
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}{offset}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Asc,
    Desc,
}

#[derive(Debug, Clone, Copy)]
enum Bound {
    None,
    Id(Ulid),
    /// Milliseconds since the epoch (an RFC 3339 cursor).
    Ms(u64),
}

/// What a query selects, modelled after SPEC §2 independently of the server.
#[derive(Debug, Clone)]
struct Range {
    types: Option<Vec<&'static str>>,
    source: Option<&'static str>,
    /// `since`: a ULID is exclusive, a time includes events ingested at or after it.
    since: Bound,
    /// `until`: exclusive, for a ULID and for a time.
    until: Bound,
}

impl Range {
    fn all() -> Range {
        Range {
            types: None,
            source: None,
            since: Bound::None,
            until: Bound::None,
        }
    }

    fn matches(&self, e: &Ev) -> bool {
        let type_ok = self.types.as_ref().is_none_or(|ts| {
            ts.iter().any(|t| match t.strip_suffix('*') {
                Some(prefix) => e.ty.starts_with(prefix),
                None => e.ty == *t,
            })
        });
        let source_ok = self.source.is_none_or(|s| e.source.as_deref() == Some(s));
        let since_ok = match self.since {
            Bound::None => true,
            Bound::Id(id) => e.ulid > id,
            Bound::Ms(ms) => e.ulid.timestamp_ms() >= ms,
        };
        let until_ok = match self.until {
            Bound::None => true,
            Bound::Id(id) => e.ulid < id,
            Bound::Ms(ms) => e.ulid.timestamp_ms() < ms,
        };
        type_ok && source_ok && since_ok && until_ok
    }
}

/// One paging run: fixed parameters, and the cursor parameter `next` replaces
/// (`since` for asc, `until` for desc).
struct Pass {
    name: String,
    order: Order,
    /// Parameters sent with every page (filters, and the bound `next` does not replace).
    fixed: Vec<(&'static str, String)>,
    /// The first page's value of the cursor parameter.
    start: Option<String>,
    range: Range,
}

struct Page {
    events: Vec<Ev>,
    next: Option<String>,
    /// Head seq just before and just after the query.
    head_before: u64,
    head_after: u64,
}

/// GET /v1/events; returns the events and `next`.
fn query(s: &Server, params: &[(&str, String)]) -> (Vec<Ev>, Option<String>) {
    let r = s
        .http()
        .get(s.url("/v1/events"))
        .query(params)
        .bearer_auth(&s.token)
        .send()
        .expect("GET /v1/events");
    let status = r.status().as_u16();
    let text = r.text().expect("body");
    assert_eq!(status, 200, "GET /v1/events {params:?}: {text}");
    let v: Value = serde_json::from_str(&text).expect("JSON body");
    let obj = v.as_object().expect("object body");
    assert!(
        obj.contains_key("next") && obj.len() == 2,
        "body must be {{data, next}}: {text}"
    );
    let events = v["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(parse_event)
        .collect();
    let next = match &v["next"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("next must be a string or null, got {other}"),
    };
    (events, next)
}

/// Pages through `pass` until `next` is null. After the first page it waits until the
/// log has grown (so every pass overlaps with appends), then counts itself in `grown`.
fn run_pass(s: &Server, pass: &Pass, max_pages: u64, grown: &AtomicUsize) -> Vec<Page> {
    let cursor_param = match pass.order {
        Order::Asc => "since",
        Order::Desc => "until",
    };
    let mut cursor = pass.start.clone();
    let mut pages = Vec::new();
    for _ in 0..max_pages {
        let mut params = pass.fixed.clone();
        params.push(("limit", LIMIT.to_string()));
        params.push((
            "order",
            match pass.order {
                Order::Asc => "asc",
                Order::Desc => "desc",
            }
            .to_string(),
        ));
        if let Some(c) = &cursor {
            params.push((cursor_param, c.clone()));
        }
        let head_before = head_seq(s);
        let (events, next) = query(s, &params);
        let head_after = head_seq(s);
        if pages.is_empty() {
            wait_until(
                Duration::from_secs(30),
                &format!("{}: the log to grow during paging", pass.name),
                || head_seq(s) > head_after,
            );
            grown.fetch_add(1, Ordering::SeqCst);
        }
        let done = next.is_none();
        cursor = next.clone();
        pages.push(Page {
            events,
            next,
            head_before,
            head_after,
        });
        if done {
            return pages;
        }
    }
    panic!("{}: next still not null after {max_pages} pages", pass.name);
}

/// Checks a finished pass against the log (`truth`, in log order, read after every
/// append ended). Returns how many events the pass collected.
fn check_pass(pass: &Pass, pages: &[Page], truth: &[Ev]) -> usize {
    let name = &pass.name;
    let by_id: HashMap<&str, &Ev> = truth.iter().map(|e| (e.id.as_str(), e)).collect();
    let expected: Vec<&Ev> = truth.iter().filter(|e| pass.range.matches(e)).collect();
    assert!(!pages.is_empty(), "{name}: no pages");

    for (i, page) in pages.iter().enumerate() {
        assert!(
            page.events.len() <= LIMIT,
            "{name}: page {i} has {} events",
            page.events.len()
        );
        for e in &page.events {
            let stored = by_id
                .get(e.id.as_str())
                .unwrap_or_else(|| panic!("{name}: page {i} has {} which is not in the log", e.id));
            assert_eq!(
                e.value, stored.value,
                "{name}: page {i}: served event differs"
            );
            assert!(
                e.seq <= page.head_after,
                "{name}: page {i} served seq {} beyond the head {}",
                e.seq,
                page.head_after
            );
        }
        if i + 1 < pages.len() {
            // Not the end of the range: a full page whose `next` is its last id.
            let next = page.next.as_deref();
            assert_eq!(
                page.events.len(),
                LIMIT,
                "{name}: page {i} with next {next:?} is not full"
            );
            assert_eq!(
                next,
                page.events.last().map(|e| e.id.as_str()),
                "{name}: page {i}: next is not the last id on the page"
            );
        } else {
            assert_eq!(page.next, None, "{name}: the last page");
        }
    }

    let collected: Vec<&Ev> = pages.iter().flat_map(|p| &p.events).collect();
    assert!(!collected.is_empty(), "{name}: nothing collected");
    let in_log_order: Vec<&Ev> = match pass.order {
        Order::Asc => collected.clone(),
        Order::Desc => collected.iter().rev().copied().collect(),
    };
    for w in in_log_order.windows(2) {
        assert!(
            w[0].ulid < w[1].ulid && w[0].seq < w[1].seq,
            "{name}: {:?} order broken between {} (seq {}) and {} (seq {})",
            pass.order,
            w[0].id,
            w[0].seq,
            w[1].id,
            w[1].seq
        );
    }
    // No skip, no repeat: exactly the matching events from the start of the range, in
    // order, up to some point...
    for (k, (got, want)) in in_log_order.iter().zip(&expected).enumerate() {
        assert_eq!(
            got.id, want.id,
            "{name}: event #{k} of the range (in log order) is {} (seq {}) but the log has {} (seq {}): skipped or repeated",
            got.id, got.seq, want.id, want.seq
        );
    }
    assert!(
        in_log_order.len() <= expected.len(),
        "{name}: collected {} events, the range holds only {}",
        in_log_order.len(),
        expected.len()
    );
    // ...and that point is at least the head when the range end was reached: the last
    // page (asc) or the first page (desc) saw the head at its query time.
    let (reference, page_no) = match pass.order {
        Order::Asc => (pages.last().expect("page"), pages.len() - 1),
        Order::Desc => (&pages[0], 0),
    };
    let must = expected
        .iter()
        .filter(|e| e.seq <= reference.head_before)
        .count();
    assert!(
        in_log_order.len() >= must,
        "{name}: collected {} events, but {must} matching events were committed before page {page_no} (head {}) was queried",
        in_log_order.len(),
        reference.head_before
    );
    if let Some(last) = in_log_order.last() {
        assert!(
            last.seq <= reference.head_after,
            "{name}: newest collected seq {} is past the head {} after page {page_no}",
            last.seq,
            reference.head_after
        );
    }
    collected.len()
}

fn post_events(s: &Server, events: Vec<Value>) -> Vec<String> {
    let (status, body) = s.post_json(&json!({ "events": events }));
    assert_eq!(status, 201, "{body}");
    body["data"]["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect()
}

#[test]
fn pages_never_skip_or_repeat_while_events_are_appended() {
    let s = Server::start(&[]);
    let mut n = 0u64;
    for _ in 0..PREFILL / 3 {
        post_events(
            &s,
            (0..3)
                .map(|_| {
                    n += 1;
                    event_value(n)
                })
                .collect(),
        );
    }
    let prefill = export(&s);
    assert_eq!(prefill.len(), PREFILL);
    let ms = |i: usize| prefill[i].ulid.timestamp_ms();

    let stop = AtomicBool::new(false);
    let appended_requests = AtomicU64::new(0);
    let first_live_id = std::sync::Mutex::new(None::<Ulid>);
    // Pagers that have seen the log grow after their first page.
    let grown = AtomicUsize::new(0);
    let pass_count = AtomicUsize::new(usize::MAX);

    std::thread::scope(|scope| {
        // The background appender: batches of 1–3 events of every type and source.
        let appender = scope.spawn(|| {
            let mut n = 10_000u64;
            for r in 0..MAX_APPEND_REQUESTS {
                if stop.load(Ordering::SeqCst)
                    || (r >= APPEND_REQUESTS
                        && grown.load(Ordering::SeqCst) >= pass_count.load(Ordering::SeqCst))
                {
                    break;
                }
                let events: Vec<Value> = (0..=r % 3)
                    .map(|_| {
                        n += 1;
                        event_value(n)
                    })
                    .collect();
                let ids = post_events(&s, events);
                first_live_id
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| Ulid::from_string(&ids[0]).expect("ULID"));
                appended_requests.fetch_add(1, Ordering::SeqCst);
            }
        });
        wait_until(
            Duration::from_secs(20),
            "the appender's first event",
            || appended_requests.load(Ordering::SeqCst) > 0,
        );
        let live_ms = first_live_id
            .lock()
            .unwrap()
            .expect("first id")
            .timestamp_ms();

        let passes = vec![
            Pass {
                name: "asc, everything".into(),
                order: Order::Asc,
                fixed: vec![],
                start: None,
                range: Range::all(),
            },
            Pass {
                name: "desc, everything".into(),
                order: Order::Desc,
                fixed: vec![],
                start: None,
                range: Range::all(),
            },
            Pass {
                name: "asc, since=earliest, types=alpha (exact)".into(),
                order: Order::Asc,
                fixed: vec![("types", "alpha".into())],
                start: Some("earliest".into()),
                range: Range {
                    types: Some(vec!["alpha"]),
                    ..Range::all()
                },
            },
            Pass {
                name: "asc, types=agent.* (prefix)".into(),
                order: Order::Asc,
                fixed: vec![("types", "agent.*".into())],
                start: None,
                range: Range {
                    types: Some(vec!["agent.*"]),
                    ..Range::all()
                },
            },
            Pass {
                name: "desc, types=alpha,agent.d*".into(),
                order: Order::Desc,
                fixed: vec![("types", "alpha,agent.d*".into())],
                start: None,
                range: Range {
                    types: Some(vec!["alpha", "agent.d*"]),
                    ..Range::all()
                },
            },
            Pass {
                name: "asc, source=s1".into(),
                order: Order::Asc,
                fixed: vec![("source", "s1".into())],
                start: None,
                range: Range {
                    source: Some("s1"),
                    ..Range::all()
                },
            },
            Pass {
                name: "desc, source=s2, types=agent.*".into(),
                order: Order::Desc,
                fixed: vec![("source", "s2".into()), ("types", "agent.*".into())],
                start: None,
                range: Range {
                    types: Some(vec!["agent.*"]),
                    source: Some("s2"),
                    ..Range::all()
                },
            },
            Pass {
                name: "asc, since=RFC 3339 (+02:00), until=RFC 3339 (past)".into(),
                order: Order::Asc,
                fixed: vec![("until", rfc3339(ms(120), 0))],
                start: Some(rfc3339(ms(40), 120)),
                range: Range {
                    since: Bound::Ms(ms(40)),
                    until: Bound::Ms(ms(120)),
                    ..Range::all()
                },
            },
            Pass {
                name: "asc, since=RFC 3339 (-05:30), open end".into(),
                order: Order::Asc,
                fixed: vec![],
                start: Some(rfc3339(ms(100), -330)),
                range: Range {
                    since: Bound::Ms(ms(100)),
                    ..Range::all()
                },
            },
            Pass {
                name: "asc, types=beta.x,alpha*, until=RFC 3339 among the live appends".into(),
                order: Order::Asc,
                fixed: vec![
                    ("types", "beta.x,alpha*".into()),
                    ("until", rfc3339(live_ms + 30, 0)),
                ],
                start: None,
                range: Range {
                    types: Some(vec!["beta.x", "alpha*"]),
                    until: Bound::Ms(live_ms + 30),
                    ..Range::all()
                },
            },
            Pass {
                name: "desc, since=RFC 3339, until=ULID".into(),
                order: Order::Desc,
                fixed: vec![("since", rfc3339(ms(20), 0))],
                start: Some(prefill[130].id.clone()),
                range: Range {
                    since: Bound::Ms(ms(20)),
                    until: Bound::Id(prefill[130].ulid),
                    ..Range::all()
                },
            },
            Pass {
                name: "desc, since=ULID, open end".into(),
                order: Order::Desc,
                fixed: vec![("since", prefill[60].id.clone())],
                start: None,
                range: Range {
                    since: Bound::Id(prefill[60].ulid),
                    ..Range::all()
                },
            },
        ];

        pass_count.store(passes.len(), Ordering::SeqCst);
        // Stops the appender also when a pager panics.
        let stop_guard = StopOnDrop(&stop);
        let max_pages = MAX_EVENTS / LIMIT as u64 + 2;
        let results: Vec<Vec<Page>> = std::thread::scope(|inner| {
            let handles: Vec<_> = passes
                .iter()
                .map(|p| inner.spawn(|| run_pass(&s, p, max_pages, &grown)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("pager panicked"))
                .collect()
        });
        drop(stop_guard);
        appender.join().expect("appender panicked");

        let truth = export(&s);
        assert_eq!(truth.len() as u64, head_seq(&s));
        assert!(
            truth.len() > PREFILL,
            "nothing was appended during the test"
        );
        for (pass, pages) in passes.iter().zip(&results) {
            let got = check_pass(pass, pages, &truth);
            eprintln!(
                "{}: {} pages, {got} events (head {} at the first page, {} at the last)",
                pass.name,
                pages.len(),
                pages[0].head_before,
                pages.last().map_or(0, |p| p.head_after)
            );
        }
        eprintln!(
            "log: {} events, {} appended by {} concurrent requests",
            truth.len(),
            truth.len() - PREFILL,
            appended_requests.load(Ordering::SeqCst)
        );
    });
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn ids_of(events: &[Ev]) -> Vec<&str> {
    events.iter().map(|e| e.id.as_str()).collect()
}

fn q(s: &Server, params: &[(&str, &str)]) -> (Vec<String>, Option<String>) {
    let params: Vec<(&str, String)> = params.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let (events, next) = query(s, &params);
    (
        ids_of(&events).into_iter().map(str::to_string).collect(),
        next,
    )
}

#[test]
fn next_is_null_exactly_at_the_end_of_the_range() {
    let s = Server::start(&[]);
    // The empty log.
    assert_eq!(q(&s, &[]), (vec![], None));
    assert_eq!(q(&s, &[("order", "desc"), ("limit", "1")]), (vec![], None));

    // Exactly ten events, types a/b alternating (a at even positions).
    let mut ids: Vec<String> = Vec::new();
    for i in 0..10 {
        let ty = if i % 2 == 0 { "a" } else { "b" };
        ids.extend(post_events(&s, vec![json!({"type": ty, "data": {"i": i}})]));
    }
    let id = |i: usize| ids[i].clone();
    let span = |r: std::ops::Range<usize>| ids[r].to_vec();
    let rev = |r: std::ops::Range<usize>| {
        let mut v = ids[r].to_vec();
        v.reverse();
        v
    };

    // limit = N: everything, next null; limit > N likewise.
    assert_eq!(q(&s, &[("limit", "10")]), (span(0..10), None));
    assert_eq!(q(&s, &[("limit", "11")]), (span(0..10), None));
    assert_eq!(q(&s, &[]), (span(0..10), None), "default limit");
    assert_eq!(
        q(&s, &[("limit", "10"), ("order", "desc")]),
        (rev(0..10), None)
    );
    // limit = N − 1: a full page with next, then the rest and null.
    assert_eq!(q(&s, &[("limit", "9")]), (span(0..9), Some(id(8))));
    assert_eq!(
        q(&s, &[("limit", "9"), ("since", &id(8))]),
        (span(9..10), None)
    );
    // N a multiple of the limit: the second full page reaches the head, so null.
    assert_eq!(q(&s, &[("limit", "5")]), (span(0..5), Some(id(4))));
    assert_eq!(
        q(&s, &[("limit", "5"), ("since", &id(4))]),
        (span(5..10), None)
    );
    assert_eq!(
        q(&s, &[("limit", "5"), ("order", "desc")]),
        (rev(5..10), Some(id(5)))
    );
    assert_eq!(
        q(&s, &[("limit", "5"), ("order", "desc"), ("until", &id(5))]),
        (rev(0..5), None)
    );
    // limit=1 pages through all ten: nine pages with next, the tenth null.
    let mut cursor: Option<String> = None;
    let mut collected = Vec::new();
    for page in 0..10 {
        let mut params = vec![("limit", "1".to_string())];
        if let Some(c) = &cursor {
            params.push(("since", c.clone()));
        }
        let (events, next) = query(&s, &params);
        assert_eq!(events.len(), 1, "page {page}");
        collected.push(events[0].id.clone());
        assert_eq!(next.is_none(), page == 9, "page {page}: next {next:?}");
        cursor = next;
    }
    assert_eq!(collected, ids);

    // At the head (asc) or before the first event (desc): empty, null.
    assert_eq!(q(&s, &[("since", &id(9))]), (vec![], None));
    assert_eq!(
        q(&s, &[("order", "desc"), ("until", &id(0))]),
        (vec![], None)
    );

    // Filters: five events of type a.
    let a: Vec<String> = (0..10).step_by(2).map(id).collect();
    assert_eq!(q(&s, &[("types", "a"), ("limit", "5")]), (a.clone(), None));
    assert_eq!(
        q(&s, &[("types", "a"), ("limit", "4")]),
        (a[..4].to_vec(), Some(a[3].clone()))
    );
    assert_eq!(
        q(&s, &[("types", "a"), ("limit", "4"), ("since", &a[3])]),
        (a[4..].to_vec(), None)
    );
    // The newest event is a b: an a-page ending at the last a is still the end.
    assert_eq!(
        q(&s, &[("types", "a"), ("limit", "1"), ("since", &a[3])]),
        (a[4..].to_vec(), None)
    );

    // until (asc): the range ends before the head.
    assert_eq!(
        q(&s, &[("until", &id(6)), ("limit", "6")]),
        (span(0..6), None)
    );
    assert_eq!(
        q(&s, &[("until", &id(6)), ("limit", "5")]),
        (span(0..5), Some(id(4)))
    );
    assert_eq!(
        q(&s, &[("until", &id(6)), ("limit", "5"), ("since", &id(4))]),
        (span(5..6), None)
    );
    // since (desc): the range ends after the oldest event.
    assert_eq!(
        q(&s, &[("order", "desc"), ("since", &id(2)), ("limit", "7")]),
        (rev(3..10), None)
    );
    assert_eq!(
        q(&s, &[("order", "desc"), ("since", &id(2)), ("limit", "6")]),
        (rev(4..10), Some(id(4)))
    );
    assert_eq!(
        q(
            &s,
            &[
                ("order", "desc"),
                ("since", &id(2)),
                ("until", &id(4)),
                ("limit", "6")
            ]
        ),
        (rev(3..4), None)
    );
}
