//! The proxy's pieces against real sockets: header rewriting, streaming, websockets.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{self, WebSocketUpgrade};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use kcloud_provision::upstream::http_client;

use super::websocket::*;
use crate::listener::*;

/// A proxied request's connection gets TCP_NODELAY at its next write; others keep
/// Nagle's algorithm.
#[tokio::test]
async fn client_stream_sets_nodelay_only_when_asked() {
    use axum::serve::Listener as _;
    use tokio::io::AsyncWriteExt;

    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let mut listener = Listener(tcp);
    for ask in [false, true] {
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut stream, peer) = listener.accept().await;
        assert_eq!(peer, client.local_addr().unwrap());
        let conn = Connection {
            addr: peer,
            nodelay: stream.nodelay.clone(),
        };
        assert!(!stream.tcp.nodelay().unwrap());
        if ask {
            conn.nodelay();
        }
        stream.write_all(b"x").await.unwrap();
        assert_eq!(stream.tcp.nodelay().unwrap(), ask);
    }
}

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn upstream(addr: SocketAddr) -> Upstream {
    Upstream {
        addr,
        token: Some(Arc::from("server-token")),
        strip_prefix: None,
    }
}

#[test]
fn prefixes_are_stripped_for_ides_served_at_the_root() {
    let mut up = upstream("127.0.0.1:1".parse().unwrap());
    let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
    assert_eq!(
        upstream_path(&uri("/user/a/s/static/x.js?v=1"), &up),
        "/user/a/s/static/x.js?v=1"
    );
    up.strip_prefix = Some(Arc::from("/user/a/s"));
    assert_eq!(
        upstream_path(&uri("/user/a/s/static/x.js?v=1"), &up),
        "/static/x.js?v=1"
    );
    assert_eq!(upstream_path(&uri("/user/a/s/"), &up), "/");
    assert_eq!(
        upstream_path(&uri("/user/a/s/?folder=/x"), &up),
        "/?folder=/x"
    );
    // Only a whole path segment counts: `/user/a/sx` is another server.
    assert_eq!(upstream_path(&uri("/user/a/sx/y"), &up), "/user/a/sx/y");
}

#[test]
fn absolute_redirects_of_stripped_ides_stay_under_their_prefix() {
    for (from, to) in [
        ("/login", "/user/a/s/login"),
        ("./?folder=/x", "./?folder=/x"),
        ("//evil.example/", "//evil.example/"),
        ("https://elsewhere/", "https://elsewhere/"),
    ] {
        let mut h = headers(&[("location", from)]);
        reprefix_location(&mut h, "/user/a/s");
        assert_eq!(h["location"], to);
    }
}

#[test]
fn ides_without_a_token_get_no_authorization_header() {
    let mut up = upstream("127.0.0.1:1".parse().unwrap());
    up.token = None;
    let h = upstream_headers(&headers(&[("authorization", "Bearer kc")]), &up).unwrap();
    assert!(!h.contains_key("authorization"));
}

#[test]
fn paths() {
    assert_eq!(split_path("/user/a/s"), Some(("a", "s", None)));
    assert_eq!(split_path("/user/a/s/"), Some(("a", "s", Some(""))));
    assert_eq!(
        split_path("/user/a/s/api/kernels/1"),
        Some(("a", "s", Some("api/kernels/1")))
    );
    for bad in ["/user/a", "/user//s/", "/user/a//x", "/users/a/s/", "/"] {
        assert_eq!(split_path(bad), None, "{bad}");
    }
}

#[test]
fn credentials_from_bearer_or_cookie() {
    for secure in [false, true] {
        let c = cookie_credential(&headers(&[("authorization", "Bearer abc")]), secure).unwrap();
        assert_eq!((c.token.as_str(), c.via_cookie), ("abc", false));
    }
    let c = cookie_credential(
        &headers(&[("cookie", "_xsrf=1; kcloud_access=jwt; x=2")]),
        false,
    )
    .unwrap();
    assert_eq!((c.token.as_str(), c.via_cookie), ("jwt", true));
    let c = cookie_credential(
        &headers(&[("cookie", "kcloud_access=tossed; __Host-kcloud_access=jwt")]),
        true,
    )
    .unwrap();
    assert_eq!(c.token, "jwt", "only the __Host- cookie counts when Secure");
    for bad in [
        headers(&[("authorization", "token server-token")]),
        headers(&[("authorization", "Bearer ")]),
        headers(&[("cookie", "_xsrf=1")]),
        HeaderMap::new(),
    ] {
        assert!(
            matches!(cookie_credential(&bad, false), Err(Error::Unauthorized(_))),
            "{bad:?}"
        );
    }
    // A cookie another origin could have set (no prefix) is no session when Secure.
    assert!(cookie_credential(&headers(&[("cookie", "kcloud_access=jwt")]), true).is_err());
}

#[test]
fn origin_is_checked_for_writes_and_websockets() {
    let here = "alice.users.example.org";
    let same = headers(&[("origin", "https://alice.users.example.org")]);
    let other = headers(&[("origin", "https://evil.example")]);
    let portal = headers(&[("origin", "https://example.org")]);
    let sibling = headers(&[("origin", "https://bob.users.example.org")]);
    let null = headers(&[("origin", "null")]);
    let none = HeaderMap::new();
    assert!(
        check_origin(&other, here, &Method::GET, false).is_ok(),
        "reads pass"
    );
    for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        assert!(check_origin(&same, here, &m, false).is_ok());
        assert!(check_origin(&none, here, &m, false).is_ok());
        for refused in [&other, &portal, &sibling] {
            assert!(matches!(
                check_origin(refused, here, &m, false),
                Err(Error::Forbidden(_))
            ));
        }
        assert!(check_origin(&null, here, &m, false).is_err());
    }
    assert!(check_origin(&same, here, &Method::GET, true).is_ok());
    assert!(
        check_origin(&other, here, &Method::GET, true).is_err(),
        "websockets"
    );
}

#[test]
fn forwarded_headers_carry_the_server_token_and_no_kcloud_credentials() {
    let client = headers(&[
        ("host", "lab.example.org"),
        ("authorization", "Bearer user-jwt"),
        ("cookie", "kcloud_access=jwt; _xsrf=x1"),
        ("cookie", "kcloud_csrf=c; username-lab=u"),
        ("x-csrf-token", "c"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("transfer-encoding", "chunked"),
        ("proxy-authorization", "Basic x"),
        ("x-xsrftoken", "x1"),
        ("content-type", "application/json"),
    ]);
    let h = upstream_headers(&client, &upstream("127.0.0.1:1".parse().unwrap())).unwrap();
    assert_eq!(h["authorization"], "token server-token");
    assert_eq!(h["cookie"], "_xsrf=x1; username-lab=u");
    assert_eq!(h.get_all("cookie").iter().count(), 1);
    assert_eq!(h["host"], "lab.example.org", "Host is kept");
    assert_eq!(h["x-xsrftoken"], "x1");
    assert_eq!(h["content-type"], "application/json");
    for gone in [
        "x-csrf-token",
        "connection",
        "x-hop",
        "keep-alive",
        "te",
        "transfer-encoding",
        "proxy-authorization",
    ] {
        assert!(!h.contains_key(gone), "{gone} forwarded");
    }
    let only_ours = headers(&[("cookie", "kcloud_access=jwt")]);
    let h = upstream_headers(&only_ours, &upstream("127.0.0.1:1".parse().unwrap())).unwrap();
    assert!(!h.contains_key("cookie"));

    let mut resp = headers(&[
        ("set-cookie", "_xsrf=2; Path=/user/a/s/"),
        ("set-cookie", "kcloud_csrf=planted; Path=/"),
        ("set-cookie", " kcloud_access=planted"),
        ("connection", "close"),
        ("content-length", "5"),
    ]);
    downstream_headers(&mut resp);
    let cookies: Vec<_> = resp.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["_xsrf=2; Path=/user/a/s/"]);
    assert!(!resp.contains_key("connection"));
    assert_eq!(resp["content-length"], "5");
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Echoes the request body back chunk by chunk as it arrives. If either direction
/// were buffered, the first chunk would never come back before the request ended.
#[tokio::test]
async fn http_bodies_stream_both_ways() {
    let echo = Router::new().route(
        "/user/a/s/echo",
        any(|req: Request| async move {
            assert_eq!(req.headers()["authorization"], "token server-token");
            assert_eq!(req.uri().query(), Some("x=1&y=%20"));
            assert_eq!(req.method(), Method::PUT);
            Response::new(Body::from_stream(req.into_body().into_data_stream()))
        }),
    );
    let addr = serve(echo).await;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body = Body::from_stream(tokio_stream_from(rx));
    let req = axum::http::Request::builder()
        .method(Method::PUT)
        .uri("/user/a/s/echo?x=1&y=%20")
        .header("authorization", "Bearer user-jwt")
        .body(body)
        .unwrap();
    let client = http_client();
    let up = upstream(addr);
    tx.send(Ok(Bytes::from_static(b"first"))).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), http_proxy(&client, req, &up))
        .await
        .expect("response head before the request body ended")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.into_body().into_data_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("first chunk streamed back while the request is still open")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"first");
    tx.send(Ok(Bytes::from_static(b"second"))).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&second[..], b"second");
    drop(tx);
    assert!(stream.next().await.is_none(), "ends when the request ends");
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn an_absent_upstream_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let up = upstream(SocketAddr::from(([127, 0, 0, 1], port)));
    let req = axum::http::Request::get("/user/a/s/")
        .body(Body::empty())
        .unwrap();
    let err = http_proxy(&http_client(), req, &up).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
}

/// A websocket server standing in for JupyterLab: checks the token, picks the
/// kernel subprotocol, echoes text and binary, closes with 4001 on "bye", and
/// reports the close frames it receives.
// tungstenite's handshake callback type fixes the error type.
#[allow(clippy::result_large_err)]
async fn ws_upstream(closes: mpsc::Sender<Option<u16>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let closes = closes.clone();
            tokio::spawn(async move {
                let check = |req: &WsRequest, mut resp: WsResponse| {
                    assert_eq!(req.headers()["authorization"], "token server-token");
                    assert_eq!(req.headers()["cookie"], "_xsrf=1");
                    assert_eq!(req.uri().path(), "/user/a/s/api/kernels/k1/channels");
                    assert_eq!(req.uri().query(), Some("session_id=9"));
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_static("v1.kernel.websocket.jupyter.org"),
                    );
                    Ok(resp)
                };
                let mut ws = tokio_tungstenite::accept_hdr_async(tcp, check)
                    .await
                    .unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        tungstenite::Message::Text(t) if t.as_str() == "bye" => {
                            let frame = tungstenite::protocol::CloseFrame {
                                code: 4001.into(),
                                reason: "bye".into(),
                            };
                            let _ = ws.send(tungstenite::Message::Close(Some(frame))).await;
                        }
                        tungstenite::Message::Close(f) => {
                            let _ = closes.send(f.map(|f| f.code.into())).await;
                            break;
                        }
                        m @ (tungstenite::Message::Text(_) | tungstenite::Message::Binary(_)) => {
                            ws.send(m).await.unwrap();
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    addr
}

async fn ws_proxy(up: Upstream) -> SocketAddr {
    let router = Router::new().route(
        "/user/a/s/{*rest}",
        any(move |mut upgrade: WebSocketUpgrade, req: Request| {
            let up = up.clone();
            async move {
                let path = req.uri().path_and_query().unwrap().as_str().to_owned();
                let (server, protocol) = match connect_upstream(&up, &path, req.headers()).await {
                    Ok(c) => c,
                    Err(Refused::Status(r)) => return r,
                    Err(Refused::Error(e)) => return ApiError(e).into_response(),
                };
                if let Some(p) = protocol {
                    upgrade.set_selected_protocol(p);
                }
                upgrade.on_upgrade(move |client| pump(client, server, || {}))
            }
        }),
    );
    serve(router).await
}

async fn ws_client(proxy: SocketAddr) -> (WebSocketStream<TcpStream>, Option<HeaderValue>) {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let mut req = format!("ws://{proxy}/user/a/s/api/kernels/k1/channels?session_id=9")
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("v1.kernel.websocket.jupyter.org"),
    );
    h.insert(
        "cookie",
        HeaderValue::from_static("kcloud_access=jwt; _xsrf=1"),
    );
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    (ws, resp.headers().get("sec-websocket-protocol").cloned())
}

#[tokio::test]
async fn websockets_carry_text_binary_and_closes_both_ways() {
    let (closes_tx, mut closes) = mpsc::channel(4);
    let up = upstream(ws_upstream(closes_tx).await);
    let proxy = ws_proxy(up).await;
    fn timeout<F: std::future::IntoFuture>(f: F) -> tokio::time::Timeout<F::IntoFuture> {
        tokio::time::timeout(Duration::from_secs(5), f)
    }

    let (mut ws, protocol) = ws_client(proxy).await;
    assert_eq!(protocol.unwrap(), "v1.kernel.websocket.jupyter.org");
    ws.send(tungstenite::Message::Text("hello".into()))
        .await
        .unwrap();
    let m = timeout(ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(m, tungstenite::Message::Text("hello".into()));
    let blob: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    ws.send(tungstenite::Message::Binary(blob.clone().into()))
        .await
        .unwrap();
    let m = timeout(ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(m, tungstenite::Message::Binary(blob.into()));
    // The client closes: the server sees the client's code.
    let frame = tungstenite::protocol::CloseFrame {
        code: 1000.into(),
        reason: "done".into(),
    };
    ws.send(tungstenite::Message::Close(Some(frame)))
        .await
        .unwrap();
    assert_eq!(timeout(closes.recv()).await.unwrap(), Some(Some(1000)));

    // The server closes: the client sees the server's code.
    let (mut ws, _) = ws_client(proxy).await;
    ws.send(tungstenite::Message::Text("bye".into()))
        .await
        .unwrap();
    let m = timeout(ws.next()).await.unwrap().unwrap().unwrap();
    match m {
        tungstenite::Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4001),
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_websocket_handshake_keeps_the_servers_status() {
    let missing = Router::new().route(
        "/user/a/s/{*rest}",
        any(|| async { (StatusCode::NOT_FOUND, "no such kernel") }),
    );
    let up = upstream(serve(missing).await);
    let h = headers(&[]);
    match connect_upstream(&up, "/user/a/s/api/kernels/nope/channels", &h).await {
        Err(Refused::Status(r)) => assert_eq!(r.status(), StatusCode::NOT_FOUND),
        Err(Refused::Error(e)) => panic!("{e:?}"),
        Ok(_) => panic!("upgraded"),
    }
}

#[test]
fn close_codes_on_the_wire() {
    assert!(sendable_close_code(1000) && sendable_close_code(4001));
    assert!(!sendable_close_code(1005) && !sendable_close_code(1006) && !sendable_close_code(999));
    let m = to_server(ws::Message::Close(Some(ws::CloseFrame {
        code: 1006,
        reason: "abnormal".into(),
    })));
    assert_eq!(m, Some(tungstenite::Message::Close(None)));
    assert_eq!(
        to_server(ws::Message::Ping(Bytes::new())),
        None,
        "pings stay per hop"
    );
    assert_eq!(to_client(tungstenite::Message::Pong(Bytes::new())), None);
}
