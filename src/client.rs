//! The HTTP client the remote CLI commands share: base URL, bearer token, and errors
//! that say what failed and where (the server's own error message included).

use std::time::Duration;

use reqwest::blocking::{Client as Http, RequestBuilder, Response};

pub struct Client {
    http: Http,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Client, String> {
        let http = Http::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(None::<Duration>)
            .build()
            .map_err(|e| format!("cannot create an HTTP client: {e}"))?;
        Ok(Client {
            http,
            base: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorized(&self, r: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// GET `path` (with its query); any non-2xx status becomes an error message.
    pub fn get(&self, path: &str) -> Result<Response, String> {
        let url = self.url(path);
        let response = self
            .authorized(self.http.get(&url))
            .send()
            .map_err(|e| format!("cannot reach {}: {}", self.base, root_cause(&e)))?;
        checked(response, &url)
    }

    /// DELETE `path`; any non-2xx status becomes an error message.
    pub fn delete(&self, path: &str) -> Result<(), String> {
        let url = self.url(path);
        let response = self
            .authorized(self.http.delete(&url))
            .send()
            .map_err(|e| format!("cannot reach {}: {}", self.base, root_cause(&e)))?;
        checked(response, &url).map(|_| ())
    }

    /// PATCH `path` with a JSON body; returns the response JSON.
    pub fn patch_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let url = self.url(path);
        let response = self
            .authorized(self.http.patch(&url))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .map_err(|e| format!("cannot reach {}: {}", self.base, root_cause(&e)))?;
        checked(response, &url)?
            .json()
            .map_err(|e| format!("{url}: the response is not JSON: {e}"))
    }

    /// POST a body with a content type; returns the response JSON.
    pub fn post(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<serde_json::Value, String> {
        let url = self.url(path);
        let response = self
            .authorized(self.http.post(&url))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .map_err(|e| format!("cannot reach {}: {}", self.base, root_cause(&e)))?;
        checked(response, &url)?
            .json()
            .map_err(|e| format!("{url}: the response is not JSON: {e}"))
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn checked(response: Response, url: &str) -> Result<Response, String> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body: serde_json::Value = response.json().unwrap_or_default();
    let mut message = format!(
        "{url}: {status}: {}",
        body["error"].as_str().unwrap_or("(no error message)")
    );
    if let Some(details) = body["details"].as_array() {
        for d in details {
            message.push_str(&format!(
                "\n  {}{}{}",
                d["index"]
                    .as_u64()
                    .map(|i| format!("event {i}: "))
                    .unwrap_or_default(),
                d["field"]
                    .as_str()
                    .map(|f| format!("{f}: "))
                    .unwrap_or_default(),
                d["message"].as_str().unwrap_or("")
            ));
        }
    }
    if status == reqwest::StatusCode::UNAUTHORIZED {
        message.push_str(
            "\n  (pass --token or set CAIRN_TOKEN; the first admin token is in <data>/admin.token)",
        );
    }
    Err(message)
}
