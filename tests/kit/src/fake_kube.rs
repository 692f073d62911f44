//! A fake Kubernetes API server over `tower_test`: a `kube::Client` whose every request
//! the test answers, asserting the exact calls a scenario makes.

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
/// Where a test sends the answer to one request.
pub type Reply = tower_test::mock::SendResponse<Response<Body>>;

/// The test's side of the fake API server.
pub struct FakeKube {
    handle: Handle,
}

impl FakeKube {
    /// A client for the code under test (namespace `default`) and the test's side.
    pub fn new() -> (kube::Client, FakeKube) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (kube::Client::new(service, "default"), FakeKube { handle })
    }

    /// The next request, which must be `method` on `path` (query apart): its JSON
    /// body (`Null` when empty), its query, and where to answer.
    pub async fn expect(&mut self, method: Method, path: &str) -> (Value, String, Reply) {
        let (req, reply) = self
            .handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {method} {path}, but the client is gone"));
        let uri = req.uri().clone();
        assert_eq!(
            (req.method(), uri.path()),
            (&method, path),
            "unexpected call {} {uri}",
            req.method()
        );
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON request body")
        };
        (body, uri.query().unwrap_or("").to_owned(), reply)
    }

    /// Fails if the client makes another call before it is dropped.
    pub async fn no_more_calls(&mut self) {
        if let Some((req, _)) = self.handle.next_request().await {
            panic!("no more calls expected, got {} {}", req.method(), req.uri());
        }
    }

    /// The next request that is not a watch (watches are parked in `parked`, never
    /// answered): its method, path, JSON body (`Null` when none) and where to answer.
    pub async fn next_call(&mut self, parked: &mut Vec<Reply>) -> (Method, String, Value, Reply) {
        loop {
            let (req, reply) = self.handle.next_request().await.expect("a call");
            if req.uri().query().is_some_and(|q| q.contains("watch=true")) {
                parked.push(reply);
                continue;
            }
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let bytes = req.into_body().collect_bytes().await.expect("request body");
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return (method, path, body, reply);
        }
    }
}

/// Answers with `status` and a JSON body.
pub fn respond(reply: Reply, status: StatusCode, body: Value) {
    let mut resp = Response::new(Body::from(serde_json::to_vec(&body).expect("JSON encodes")));
    *resp.status_mut() = status;
    reply.send_response(resp);
}

/// A `Status` object as the API server sends with an error.
pub fn api_status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": format!("fake {reason}"), "reason": reason, "code": code})
}

/// Answers with an API error.
pub fn fail(reply: Reply, code: u16, reason: &str) {
    respond(
        reply,
        StatusCode::from_u16(code).expect("a status code"),
        api_status(code, reason),
    );
}

/// Answers a create with the object it sent, given a uid.
pub fn created(reply: Reply, mut obj: Value, uid: &str) {
    obj["metadata"]["uid"] = json!(uid);
    respond(reply, StatusCode::CREATED, obj);
}

/// A list of `kind` at resource version 10.
pub fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "10"}, "items": items})
}

/// Runs the call under test beside the fake's scenario; both must finish.
pub async fn scenario<T>(
    call: impl std::future::Future<Output = T>,
    fake: impl std::future::Future<Output = ()> + Send + 'static,
) -> T {
    let fake = tokio::spawn(fake);
    let out = call.await;
    fake.await.expect("the fake API server's scenario");
    out
}
