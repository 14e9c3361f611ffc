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

/// One row of `cairn token list`, from the store or from `GET /v1/tokens`.
#[derive(serde::Deserialize)]
struct Listed {
    id: String,
    role: String,
    name: String,
    types: Option<Vec<String>>,
    created_at: String,
}

impl From<TokenRecord> for Listed {
    fn from(r: TokenRecord) -> Listed {
        Listed {
            id: r.id,
            role: r.role.as_str().to_string(),
            name: r.name,
            types: r.types,
            created_at: r.created_at,
        }
    }
}

fn print_list(rows: &[Listed]) {
    println!("ID\tROLE\tNAME\tTYPES\tCREATED");
    for t in rows {
        let types = t.types.as_ref().map_or("-".to_string(), |t| t.join(","));
        println!(
            "{}\t{}\t{}\t{types}\t{}",
            t.id, t.role, t.name, t.created_at
        );
    }
}

fn offline(args: &TokenArgs, data: &std::path::Path) -> Result<(), String> {
    let dir = DataDir::lock_existing(data).map_err(|e| e.to_string())?;
    let store = Arc::new(Store::open(dir).map_err(|e| e.to_string())?);
    let cluster = store.cluster_stream().map_err(|e| e.to_string())?;
    if let Some(stream) = cluster.filter(|_| !matches!(args.action, TokenAction::List)) {
        // A change here would reach this node only, and be undone when it rejoins.
        return Err(format!(
            "{} is a node of the cluster stream {stream}: its tokens are the cluster's; \
             create or revoke them through a running node (--url with an admin token)",
            data.display()
        ));
    }
    let tokens = Tokens::load(store).map_err(|e| e.to_string())?;
    match &args.action {
        TokenAction::Create { role, name, types } => {
            let problems = validate_new_token(Some(name), types.as_deref());
            if !problems.is_empty() {
                let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
                return Err(messages.join("; "));
            }
            let (_, secret) = tokens
                .create(*role, name, types.clone())
                .map_err(|e| e.to_string())?;
            println!("{secret}");
        }
        TokenAction::List => {
            let rows: Vec<Listed> = tokens.list().into_iter().map(Listed::from).collect();
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
            #[derive(serde::Deserialize)]
            struct Listing {
                data: Vec<Listed>,
            }
            let listing: Listing = client
                .get("/v1/tokens")?
                .json()
                .map_err(|e| format!("the server's token list does not parse: {e}"))?;
            print_list(&listing.data);
        }
        TokenAction::Revoke { id } => {
            client.delete(&format!("/v1/tokens/{id}"))?;
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}
