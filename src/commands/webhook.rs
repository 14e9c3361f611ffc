//! `cairn webhook create|list|show|pause|resume|replay|delete` (SPEC §7): through a
//! running server's API, or directly on a stopped server's data directory (the server
//! starts the delivery tasks when it next starts).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{Value, json};

use crate::cli::{WebhookAction, WebhookArgs, WebhookPlace};
use crate::client::Client;
use crate::commands::resolve_since;
use crate::event::Problem;
use crate::store::{DataDir, Store};
use crate::webhook::{self, Patch, View, WebhookRecord};

pub fn run(args: &WebhookArgs) -> Result<ExitCode, String> {
    match &args.action {
        WebhookAction::Create {
            url,
            name,
            types,
            source,
            since,
            batch,
            data,
            server,
            token,
        } => {
            let mut body = json!({ "url": url, "batch": batch });
            for (key, value) in [("name", name), ("source", source)] {
                if let Some(v) = value {
                    body[key] = json!(v);
                }
            }
            if let Some(t) = types {
                body["types"] = json!(t);
            }
            if let Some(s) = since {
                body["since"] = json!(resolve_since(s));
            }
            match (data, server) {
                (None, Some(server)) => {
                    let client = Client::new(server, token.clone())?;
                    let created = client.post(
                        "/v1/webhooks",
                        "application/json",
                        body.to_string().into_bytes(),
                    )?;
                    let id = created["data"]["id"].as_str().unwrap_or("?");
                    eprintln!("created webhook {id}");
                    let secret = created["data"]["secret"]
                        .as_str()
                        .ok_or("the server's response has no secret")?;
                    println!("{secret}");
                }
                (data, _) => {
                    let new = webhook::parse_new(body.to_string().as_bytes())
                        .map_err(|p| problems(&p))?;
                    let store = open(data.as_deref())?;
                    let record = webhook::new_record(new, store.head().id);
                    webhook::save(&store, &record, true).map_err(|e| e.to_string())?;
                    eprintln!("created webhook {}", record.id);
                    println!("{}", record.secret);
                }
            }
        }
        WebhookAction::List { place } => {
            let rows = match remote(place)? {
                Some(client) => client
                    .get("/v1/webhooks")?
                    .json::<Value>()
                    .map_err(|e| format!("the server's webhook list does not parse: {e}"))?["data"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                None => {
                    let store = open(place.data.as_deref())?;
                    webhook::load_all(&store)
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .map(offline_json)
                        .collect()
                }
            };
            println!("ID\tSTATE\tCURSOR\tDELIVERED\tFAILURES\tNAME\tURL");
            for w in rows {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    text(&w["id"]),
                    text(&w["state"]),
                    text(&w["cursor"]),
                    w["delivered"],
                    w["failures"],
                    text(&w["name"]),
                    text(&w["url"]),
                );
            }
        }
        WebhookAction::Show { id, place } => {
            let shown = match remote(place)? {
                Some(client) => client
                    .get(&format!("/v1/webhooks/{id}"))?
                    .json::<Value>()
                    .map_err(|e| format!("the server's answer does not parse: {e}"))?["data"]
                    .take(),
                None => offline_json(find(&open(place.data.as_deref())?, id)?),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&shown).unwrap_or_default()
            );
        }
        WebhookAction::Pause { id, place } => {
            change(place, id, json!({"paused": true}))?;
            eprintln!("paused {id}");
        }
        WebhookAction::Resume { id, place } => {
            change(place, id, json!({"paused": false}))?;
            eprintln!("resumed {id}");
        }
        WebhookAction::Replay { id, since, place } => {
            change(place, id, json!({"cursor": resolve_since(since)}))?;
            eprintln!("{id}: delivery continues after {since}");
        }
        WebhookAction::Delete { id, place } => {
            match remote(place)? {
                Some(client) => client.delete(&format!("/v1/webhooks/{id}"))?,
                None => {
                    let store = open(place.data.as_deref())?;
                    if !store.remove_webhook_record(id).map_err(|e| e.to_string())? {
                        return Err(format!("no webhook with id {id}"));
                    }
                }
            }
            eprintln!("deleted {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| "-".to_string(), str::to_string)
}

fn problems(found: &[Problem]) -> String {
    found
        .iter()
        .map(|p| match &p.field {
            Some(f) => format!("{f}: {}", p.message),
            None => p.message.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The server to talk to, when one is named and no data directory is.
fn remote(place: &WebhookPlace) -> Result<Option<Client>, String> {
    match (&place.data, &place.url) {
        (None, Some(url)) => Client::new(url, place.token.clone()).map(Some),
        _ => Ok(None),
    }
}

fn open(data: Option<&Path>) -> Result<Store, String> {
    let path = data.map_or_else(|| PathBuf::from("data"), Path::to_path_buf);
    let dir = DataDir::lock_existing(&path).map_err(|e| e.to_string())?;
    let store = Store::open(dir).map_err(|e| e.to_string())?;
    if let Some(stream) = store.cluster_stream().map_err(|e| e.to_string())? {
        // A cluster node keeps no webhooks of its own: they are the cluster's.
        return Err(format!(
            "{} is a node of the cluster stream {stream}: its webhooks are the cluster's; \
             manage them through a running node (--url with an admin token)",
            path.display()
        ));
    }
    Ok(store)
}

fn find(store: &Store, id: &str) -> Result<WebhookRecord, String> {
    webhook::load_all(store)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| format!("no webhook with id {id}"))
}

fn offline_json(record: WebhookRecord) -> Value {
    serde_json::to_value(crate::api::webhook_json(View::of_record(record), false))
        .unwrap_or_default()
}

/// A PATCH, through the server or on the stored record.
fn change(place: &WebhookPlace, id: &str, body: Value) -> Result<(), String> {
    match remote(place)? {
        Some(client) => client
            .patch_json(&format!("/v1/webhooks/{id}"), &body)
            .map(|_| ()),
        None => {
            let patch: Patch =
                webhook::parse_patch(body.to_string().as_bytes()).map_err(|p| problems(&p))?;
            let store = open(place.data.as_deref())?;
            let mut record = find(&store, id)?;
            webhook::apply_patch(&mut record, &patch);
            webhook::save(&store, &record, true).map_err(|e| e.to_string())
        }
    }
}
