//! `GET /v1/openapi.json` (SPEC §2): the OpenAPI 3.1 document of the HTTP API.
//!
//! A hand-written document would drift from the code, so this one is generated, and it
//! stays true in three ways:
//!
//! - **Routes.** [`super::routes`] registers every handler through utoipa-axum's
//!   `routes!`, which adds the handler to the router *and* its `#[utoipa::path]`
//!   operation to the document, path and methods taken from that one attribute. A
//!   handler without the attribute does not compile there.
//! - **Bodies.** Response schemas are derived (`ToSchema`) from the types the handlers
//!   serialize, errors included ([`super::error::Body`], with the list of codes).
//!   `#[serde(deny_unknown_fields)]` on them makes the document say
//!   `additionalProperties: false`, which is true: they have no other members. What the
//!   server writes or reads by hand (events are stored JCS lines; query pages are
//!   assembled around them; ingest and token bodies are parsed member by member, unknown
//!   members refused) is described by the types in [`wire`], which are never built:
//!   they sit together here, each naming the code it mirrors, so a change to that code
//!   has one place to update.
//! - **Checks.** `tests/openapi.rs` fetches the document from a live server, compares
//!   its routes with the contract's and probes each operation; `.ci/schemathesis` fuzzes
//!   a live server from the document: any 5xx, or any response whose status, content
//!   type, headers or body the document does not describe, fails CI.

use std::sync::LazyLock;

use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, RefOr, Required, schema};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToSchema};

pub use super::error::Body as Error;

/// Where the document starts: info, tags and security schemes. The paths and schemas
/// are added by [`super::routes`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "cairn",
        description = "A self-hosted, hash-chained, durable event log with gap-free streaming. \
            Every `/v1` route needs a token (`Authorization: Bearer <token>`, or `?token=<token>` \
            for browsers' EventSource); `/`, `/healthz`, `/metrics` and this document need none. \
            Every error has the body `Error` with a matching status. Besides the responses listed \
            for each operation, an unknown path gets 404 `not_found` and a method that a path \
            does not serve gets 405 `method_not_allowed` with an `Allow` header, with or without \
            a token.",
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "events", description = "Appending and reading the log"),
        (name = "streams", description = "Live delivery: Server-Sent Events and WebSocket"),
        (name = "proofs", description = "Signed checkpoints and Merkle proofs"),
        (name = "tokens", description = "Token management (role admin)"),
        (name = "webhooks", description = "Durable push of events to a URL, signed per Standard Webhooks (role admin)"),
        (name = "admin", description = "Retention: the manual prune (role admin)"),
        (name = "operations", description = "Health, metrics, the dashboard and this document"),
    )
)]
pub struct ApiDoc;

/// The two ways a token may be presented. Operations name them in `security(...)`
/// (`bearer`, `query_token`).
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "query_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "The same token as a query parameter, for clients that cannot set headers \
                 (a browser's EventSource). Authorization wins when both are given.",
            ))),
        );
    }
}

/// The document, built once from the routes.
static DOCUMENT: LazyLock<Document> = LazyLock::new(|| super::routes().into_openapi());

/// The OpenAPI 3.1 document of this API
///
/// Describes every route, parameter, request body, response body and error. No token needed.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json",
            body = serde_json::Value),
    )
)]
pub async fn openapi_json() -> axum::Json<&'static Document> {
    axum::Json(&DOCUMENT)
}

/// Schemas of strings the API sends in many places.
macro_rules! string_schema {
    ($name:ident, $description:literal, $pattern:expr) => {
        #[doc = $description]
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<schema::Schema> {
                schema::ObjectBuilder::new()
                    .schema_type(schema::Type::String)
                    .description(Some($description))
                    .pattern(Some($pattern))
                    .into()
            }
        }

        impl ToSchema for $name {}
    };
}

string_schema!(
    EventId,
    "A ULID: 26 characters of Crockford base32, upper case.",
    "^[0-7][0-9A-HJKMNP-TV-Z]{25}$"
);
string_schema!(
    Hash,
    "A SHA-256 hash as 64 lowercase hex digits.",
    "^[0-9a-f]{64}$"
);
string_schema!(
    Timestamp,
    "An RFC 3339 time in UTC with an upper-case Z; the fractional digits (at most 9) are \
     kept exactly as given.",
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z$"
);

string_schema!(
    TimestampInput,
    "When the event happened: RFC 3339, any offset, `T`/`t`, `Z`/`z`, at most 9 \
     fractional digits, no leap second, UTC year 0000–9999.",
    format!("^{RFC3339_INPUT}$")
);
string_schema!(
    TypePattern,
    "An exact type name, or a prefix ending in `*` (`agent.*`; `*` alone matches every type).",
    format!("^({TYPE_ENTRY})$")
);

string_schema!(
    Cursor,
    "A cursor: a ULID (delivery continues after it), an RFC 3339 time (events ingested at \
     or after it) or `earliest`.",
    format!("^(earliest|{ULID_INPUT}|{RFC3339_INPUT})$")
);

/// A boolean that is always true (or, below, false) where it is used.
macro_rules! constant_bool {
    ($name:ident, $value:literal) => {
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<schema::Schema> {
                schema::ObjectBuilder::new()
                    .schema_type(schema::Type::Boolean)
                    .enum_values(Some([$value]))
                    .into()
            }
        }

        impl ToSchema for $name {}
    };
}

constant_bool!(True, true);
constant_bool!(False, false);

/// JSON the server reads or writes by hand, described for the document. None of these
/// types is ever built: each mirrors the code named in its doc comment. They derive
/// `Serialize` only so that serde's attributes (`rename`, `deny_unknown_fields`) shape
/// the schema as they would shape the JSON.
#[allow(dead_code, reason = "these types only describe JSON handled by hand")]
pub mod wire {
    use serde::Serialize;
    use utoipa::ToSchema;

    use super::{Cursor, EventId, Hash, Timestamp, TimestampInput, TypePattern};
    use crate::auth::Role;

    /// An event as stored and served: every byte is the RFC 8785 (JCS) form of this
    /// object, members sorted (`chain::seal`).
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    #[schema(as = Event)]
    pub struct ServedEvent {
        #[schema(value_type = EventId)]
        id: String,
        /// 1-based position in the log.
        #[schema(minimum = 1)]
        seq: u64,
        #[serde(rename = "type")]
        #[schema(pattern = "^[A-Za-z0-9._:/-]{1,128}$")]
        event_type: String,
        #[schema(value_type = Timestamp)]
        timestamp: String,
        /// Who emitted the event; absent when not given (never null).
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(min_length = 1, max_length = 256, nullable = false)]
        source: Option<String>,
        /// Any JSON value, in its canonical form.
        #[schema(value_type = Value)]
        data: serde_json::Value,
        /// `hash` of the event at `seq − 1`; 64 zeros for `seq` 1.
        #[schema(value_type = Hash)]
        prev_hash: String,
        /// SHA-256(0x00 ‖ JCS(the event without `hash`)).
        #[schema(value_type = Hash)]
        hash: String,
    }

    /// `{"data": Event}` (`api::read::event_by_id`).
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct EventEnvelope {
        data: ServedEvent,
    }

    /// One page of a query (`api::read::query`).
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct EventPage {
        #[schema(max_items = 1000)]
        data: Vec<ServedEvent>,
        /// The last id on the page when the range holds more; null at its end. Pass it
        /// back as `since` (asc) or `until` (desc) with the same other parameters.
        #[schema(value_type = Option<EventId>, required = true)]
        next: Option<String>,
        /// Present when the range starts before the retention horizon: the first
        /// retained id (the page starts there; SPEC §8).
        #[schema(value_type = Option<EventId>)]
        #[serde(skip_serializing_if = "Option::is_none")]
        pruned_before: Option<String>,
    }

    /// One event to append (`event::validate_event`). Every problem is reported, each
    /// with its `index`; unknown members are refused.
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct NewEvent {
        /// `^[A-Za-z0-9._:/-]{1,128}$`; `connected`, `open` and `error` are reserved.
        #[serde(rename = "type")]
        #[schema(pattern = "^[A-Za-z0-9._:/-]{1,128}$")]
        event_type: String,
        /// When the event happened: RFC 3339, any offset, at most 9 fractional digits, no
        /// leap second, UTC year 0000–9999. Absent or null: the ingest time.
        #[schema(value_type = Option<TimestampInput>)]
        timestamp: Option<String>,
        /// 1–256 Unicode scalar values, no control characters. Null means absent.
        #[schema(min_length = 1, max_length = 256)]
        source: Option<String>,
        /// Any I-JSON value (no duplicate keys, no lone surrogates, no integer beyond
        /// ±(2^53−1)); `{}` when absent.
        #[schema(value_type = Value, required = false)]
        data: Option<serde_json::Value>,
    }

    /// Several events in one atomic request (`event::parse_request`).
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct EventBatch {
        /// At least one event; at most `--max-events-per-request` (default 10,000: 413
        /// beyond).
        #[schema(min_items = 1)]
        events: Vec<NewEvent>,
    }

    /// The JSON body of an append: one event, or a batch.
    #[derive(Serialize, ToSchema)]
    #[serde(untagged)]
    pub enum IngestBody {
        One(NewEvent),
        Batch(EventBatch),
    }

    /// `POST /v1/tokens` (`api::tokens::parse_new_token`). Unknown members are refused.
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct NewToken {
        role: Role,
        /// 1–128 characters, no control characters.
        #[schema(min_length = 1, max_length = 128)]
        name: String,
        /// The only types this token may read (and, for ingest, append): exact names and
        /// `prefix*` patterns. Absent or null: every type.
        #[schema(value_type = Option<Vec<TypePattern>>, min_items = 1)]
        types: Option<Vec<String>>,
    }

    /// `POST /v1/webhooks` (`webhook::parse_new`). Unknown members are refused.
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct NewWebhook {
        /// An http or https URL, at most 2048 characters, without user name or password.
        #[schema(max_length = 2048)]
        url: String,
        /// 1–128 characters, no control characters.
        #[schema(min_length = 1, max_length = 128)]
        name: Option<String>,
        /// Exact types and `prefix*` patterns; absent or null: every type.
        #[schema(value_type = Option<Vec<TypePattern>>, min_items = 1, max_items = 256)]
        types: Option<Vec<String>>,
        /// Only events with exactly this source.
        #[schema(min_length = 1, max_length = 256)]
        source: Option<String>,
        /// Where delivery starts: a ULID (after it), an RFC 3339 time or `earliest`;
        /// absent: the head now (only new events).
        #[schema(value_type = Option<Cursor>)]
        since: Option<String>,
        /// Most events per request (default 1: the body is the event itself).
        #[schema(minimum = 1, maximum = 1000)]
        batch: Option<u32>,
    }

    /// `PATCH /v1/webhooks/{id}` (`webhook::parse_patch`): at least one member.
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct WebhookPatch {
        /// Pause (true) or resume (false).
        paused: Option<bool>,
        /// Where delivery continues: a ULID (after it), an RFC 3339 time or `earliest`.
        #[schema(value_type = Option<Cursor>)]
        cursor: Option<String>,
    }
}

/// What a query and an export deliver (`api::read::Selection`): `since`, `until`,
/// `types`, `source`.
pub struct SelectionParams;

impl IntoParams for SelectionParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![since(), until(), types(), source()]
    }
}

/// What a stream delivers: a selection without `until` (a stream continues live, so
/// `until` is a 400). `Last-Event-ID` wins over `since`; with neither, delivery starts
/// at the current head.
pub struct StreamParams;

impl IntoParams for StreamParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![since(), types(), source()]
    }
}

/// What `since` and `until` take besides `earliest`: a ULID, either case.
const ULID_INPUT: &str = "[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}";
/// An RFC 3339 date-time, lexically (`rfc3339::parse` also checks the calendar).
const RFC3339_INPUT: &str = "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})";
/// One entry of a type filter (`cursor::TypeFilter`).
const TYPE_ENTRY: &str = "[A-Za-z0-9._:/-]{1,128}|[A-Za-z0-9._:/-]{0,128}\\*";

fn query_param(name: &str, description: &str, pattern: Option<String>) -> Parameter {
    let schema = schema::ObjectBuilder::new()
        .schema_type(schema::Type::String)
        .min_length(Some(1))
        .pattern(pattern);
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

fn since() -> Parameter {
    query_param(
        "since",
        "Where to start: a ULID (events after it, exclusive; it need not be a stored id), \
         an RFC 3339 time (events ingested at or after it) or `earliest`.",
        Some(format!("^(earliest|{ULID_INPUT}|{RFC3339_INPUT})$")),
    )
}

fn until() -> Parameter {
    query_param(
        "until",
        "Where to stop (exclusive): a ULID or an RFC 3339 time.",
        Some(format!("^({ULID_INPUT}|{RFC3339_INPUT})$")),
    )
}

fn types() -> Parameter {
    query_param(
        "types",
        "A comma list of exact type names and prefix patterns ending in `*` (`agent.*`); \
         at most 256 entries.",
        Some(format!("^({TYPE_ENTRY})(,({TYPE_ENTRY})){{0,255}}$")),
    )
}

fn source() -> Parameter {
    query_param("source", "Only events with exactly this source.", None)
}
