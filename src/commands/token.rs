//! `cairn token create|list|revoke`: through a running server's API (`--url`), or
//! directly on a stopped server's data directory.

use std::process::ExitCode;
use std::sync::Arc;

use crate::auth::{TokenRecord, Tokens, validate_new_token};
use crate::cli::{TokenAction, TokenArgs};
use crate::client::Client;
use crate::store::{DataDir, Store};

pub fn run(args: &TokenArgs) -> Result<ExitCode, String> {
    match (&args.data, &args.url) {
        (None, Some(url)) => remote(args, &Client::new(url, args.token.clone())?),
        (data, _) => offline(
            args,
            data.as_deref().unwrap_or(std::path::Path::new("data")),
        ),
    }
    .map(|()| ExitCode::SUCCESS)
}

fn print_list(records: &[(String, String, String, Option<Vec<String>>, String)]) {
    println!("ID\tROLE\tNAME\tTYPES\tCREATED");
    for (id, role, name, types, created) in records {
        let types = types.as_ref().map_or("-".to_string(), |t| t.join(","));
        println!("{id}\t{role}\t{name}\t{types}\t{created}");
    }
}

fn offline(args: &TokenArgs, data: &std::path::Path) -> Result<(), String> {
    let dir = DataDir::lock_existing(data).map_err(|e| e.to_string())?;
    let store = Arc::new(Store::open(dir).map_err(|e| e.to_string())?);
    let tokens = Tokens::load(store).map_err(|e| e.to_string())?;
    match &args.action {
        TokenAction::Create { role, name, types } => {
            validate_new_token(name, types.as_deref()).map_err(|e| e.to_string())?;
            let (_, secret) = tokens
                .create(*role, name, types.clone())
                .map_err(|e| e.to_string())?;
            println!("{secret}");
        }
        TokenAction::List => {
            let rows: Vec<_> = tokens.list().into_iter().map(row).collect();
            print_list(&rows);
        }
        TokenAction::Revoke { id } => {
            if !tokens.revoke(id).map_err(|e| e.to_string())? {
                return Err(format!("no token with id {id}"));
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

fn row(r: TokenRecord) -> (String, String, String, Option<Vec<String>>, String) {
    (
        r.id,
        r.role.as_str().to_string(),
        r.name,
        r.types,
        r.created_at,
    )
}

fn remote(args: &TokenArgs, client: &Client) -> Result<(), String> {
    match &args.action {
        TokenAction::Create { role, name, types } => {
            let body = serde_json::json!({ "role": role.as_str(), "name": name, "types": types });
            let response = client.post(
                "/v1/tokens",
                "application/json",
                body.to_string().into_bytes(),
            )?;
            let secret = response["data"]["token"]
                .as_str()
                .ok_or("the server's response has no token")?;
            println!("{secret}");
        }
        TokenAction::List => {
            let response: serde_json::Value = client
                .get("/v1/tokens")?
                .json()
                .map_err(|e| format!("the response is not JSON: {e}"))?;
            let rows: Vec<_> = response["data"]
                .as_array()
                .ok_or("the server's response has no token list")?
                .iter()
                .map(|t| {
                    let text = |k: &str| t[k].as_str().unwrap_or_default().to_string();
                    let types = t["types"].as_array().map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    });
                    (
                        text("id"),
                        text("role"),
                        text("name"),
                        types,
                        text("created_at"),
                    )
                })
                .collect();
            print_list(&rows);
        }
        TokenAction::Revoke { id } => {
            client.delete(&format!("/v1/tokens/{id}"))?;
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}
