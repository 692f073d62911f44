//! Kernel round trip: `execute_request` for `1+1` over a Jupyter kernel's websocket
//! (`.../api/kernels/{id}/channels`), timed until both its `execute_result` and its
//! `execute_reply` have arrived, for several paths to the same kernel side by side.
//!
//! Each target is `LABEL=URL` with the `Authorization` header value in `--auth LABEL=VALUE`
//! (JupyterLab directly: `token ...`; through kcloud: `Bearer ...`), more request headers
//! in `--header 'LABEL=Name: value'` (a user origin's cookie and `Origin`), and where to
//! connect in `--connect LABEL=HOST:PORT` when the URL's host does not resolve (a
//! `{user}.localhost` origin, which browsers resolve themselves). Rounds alternate the
//! targets; each round opens a fresh websocket, sends `--warmup` untimed executions,
//! then `--n` timed ones, one at a time. With `--quickack both`, every target is also
//! run with a client that acknowledges every read at once (TCP_QUICKACK), which is what
//! takes a Nagle-holding server's ~40 ms delayed-ACK wait out of the picture.
//!
//! Usage: cargo run --release -p kcloud-aggregator --example bench_kernel --
//!          --target direct=ws://127.0.0.1:P/user/u/s/api/kernels/ID/channels
//!          --auth 'direct=token T' [--target ... --auth ... --header ... --connect ...]
//!          [--n 200] [--warmup 10] [--rounds 3] [--quickack off|on|both]
//! Prints a Markdown table (median and p99 per round, and over all rounds) and one
//! `RESULT label quickack median_ms p99_ms` line per row.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// A client socket that optionally acknowledges every read at once.
struct Client {
    tcp: TcpStream,
    quickack: bool,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if self.quickack && matches!(polled, Poll::Ready(Ok(()))) {
            let _ = rustix::net::sockopt::set_tcp_quickack(&self.tcp, true);
        }
        polled
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

struct Args {
    targets: Vec<(String, String)>,
    auth: BTreeMap<String, String>,
    headers: BTreeMap<String, Vec<(String, String)>>,
    connect: BTreeMap<String, String>,
    n: usize,
    warmup: usize,
    rounds: usize,
    quickack: Vec<bool>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        targets: Vec::new(),
        auth: BTreeMap::new(),
        headers: BTreeMap::new(),
        connect: BTreeMap::new(),
        n: 200,
        warmup: 10,
        rounds: 3,
        quickack: vec![false],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let pair = |v: String| {
            v.split_once('=')
                .map(|(l, r)| (l.to_owned(), r.to_owned()))
                .ok_or(format!("{flag} expects LABEL=VALUE"))
        };
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--target" => a.targets.push(pair(value()?)?),
            "--auth" => {
                let (l, v) = pair(value()?)?;
                a.auth.insert(l, v);
            }
            "--header" => {
                let (l, v) = pair(value()?)?;
                let (name, v) = v
                    .split_once(':')
                    .ok_or("--header expects LABEL=Name: value")?;
                let header = (name.trim().to_owned(), v.trim().to_owned());
                a.headers.entry(l).or_default().push(header);
            }
            "--connect" => {
                let (l, v) = pair(value()?)?;
                a.connect.insert(l, v);
            }
            "--n" => a.n = num(value()?)?.max(1),
            "--warmup" => a.warmup = num(value()?)?,
            "--rounds" => a.rounds = num(value()?)?.max(1),
            "--quickack" => {
                a.quickack = match value()?.as_str() {
                    "off" => vec![false],
                    "on" => vec![true],
                    "both" => vec![false, true],
                    other => return Err(format!("--quickack: off|on|both, not {other}")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.targets.is_empty() {
        return Err("give at least one --target LABEL=URL".into());
    }
    Ok(a)
}

fn execute_request(session: &str, msg_id: &str) -> String {
    serde_json::json!({
        "header": {
            "msg_id": msg_id, "session": session, "username": "bench",
            "msg_type": "execute_request", "version": "5.3",
            "date": "2026-01-01T00:00:00.000000Z",
        },
        "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
        "content": {
            "code": "1+1", "silent": false, "store_history": false,
            "user_expressions": {}, "allow_stdin": false, "stop_on_error": true,
        },
    })
    .to_string()
}

/// How to reach one target.
struct Target<'a> {
    url: &'a str,
    auth: Option<&'a str>,
    headers: &'a [(String, String)],
    /// `HOST:PORT` to connect to instead of the URL's.
    connect: Option<&'a str>,
}

/// One round on a fresh websocket: the timed round trips, in milliseconds.
async fn round(
    t: &Target<'_>,
    quickack: bool,
    warmup: usize,
    n: usize,
) -> Result<Vec<f64>, String> {
    let url = t.url;
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    if let Some(a) = t.auth {
        let v = HeaderValue::from_str(a).map_err(|e| format!("bad auth value: {e}"))?;
        req.headers_mut().insert("authorization", v);
    }
    for (name, value) in t.headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("bad header name: {e}"))?;
        let v = HeaderValue::from_str(value).map_err(|e| format!("bad header value: {e}"))?;
        req.headers_mut().insert(name, v);
    }
    let addr = match t.connect {
        Some(a) => a.to_owned(),
        None => {
            let host = req.uri().host().ok_or("URL without host")?;
            format!("{host}:{}", req.uri().port_u16().unwrap_or(80))
        }
    };
    let tcp = TcpStream::connect(addr.as_str())
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // Our own writes are never held back: the comparison is about the other side.
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, Client { tcp, quickack })
        .await
        .map_err(|e| format!("websocket handshake with {url}: {e}"))?;
    let session = uuid::Uuid::new_v4().to_string();
    let mut times = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let msg_id = uuid::Uuid::new_v4().to_string();
        let start = Instant::now();
        ws.send(Message::text(execute_request(&session, &msg_id)))
            .await
            .map_err(|e| format!("send: {e}"))?;
        let (mut result, mut reply) = (false, false);
        while !(result && reply) {
            let next = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .map_err(|_| "no execute_reply within 30 s".to_owned())?;
            let text = match next {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => return Err(format!("unexpected message {other:?}")),
                Some(Err(e)) => return Err(format!("receive: {e}")),
                None => return Err("the websocket closed".into()),
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
            if v["parent_header"]["msg_id"] != msg_id.as_str() {
                continue;
            }
            match v["header"]["msg_type"].as_str() {
                Some("execute_result") => {
                    if v["content"]["data"]["text/plain"] != "2" {
                        return Err(format!("1+1 gave {}", v["content"]["data"]));
                    }
                    result = true;
                }
                Some("execute_reply") => {
                    if v["content"]["status"] != "ok" {
                        return Err(format!("execute_reply: {}", v["content"]));
                    }
                    reply = true;
                }
                _ => {}
            }
        }
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let _ = ws.close(None).await;
    Ok(times)
}

/// The value at quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// A measured path: its label and whether the client acknowledges at once.
type PathKey = (String, bool);
/// One round's round-trip times, ms.
type RoundSamples = Vec<f64>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_kernel: {e}");
            std::process::exit(2);
        }
    };
    let mut rows: Vec<(PathKey, Vec<RoundSamples>)> = Vec::new();
    for (label, _) in &args.targets {
        for &q in &args.quickack {
            rows.push(((label.clone(), q), Vec::new()));
        }
    }
    for r in 0..args.rounds {
        for ((label, q), samples) in rows.iter_mut() {
            let url = &args.targets.iter().find(|(l, _)| l == label).map(|t| &t.1);
            let Some(url) = url else { continue };
            let target = Target {
                url,
                auth: args.auth.get(label).map(String::as_str),
                headers: args.headers.get(label).map_or(&[], Vec::as_slice),
                connect: args.connect.get(label).map(String::as_str),
            };
            match round(&target, *q, args.warmup, args.n).await {
                Ok(t) => {
                    let s = sorted(t.clone());
                    eprintln!(
                        "round {}: {label} quickack={q}: median {:.2} ms, p99 {:.2} ms",
                        r + 1,
                        quantile(&s, 0.5),
                        quantile(&s, 0.99)
                    );
                    samples.push(t);
                }
                Err(e) => {
                    eprintln!("bench_kernel: {label}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    println!(
        "| path | client QUICKACK | per round: median / p99 (ms) | all rounds: median | p99 |"
    );
    println!("|---|---|---|---|---|");
    for ((label, q), samples) in &rows {
        let per: Vec<String> = samples
            .iter()
            .map(|t| {
                let s = sorted(t.clone());
                format!("{:.2} / {:.2}", quantile(&s, 0.5), quantile(&s, 0.99))
            })
            .collect();
        let all = sorted(samples.concat());
        let (med, p99) = (quantile(&all, 0.5), quantile(&all, 0.99));
        println!(
            "| {label} | {} | {} | {med:.2} ms | {p99:.2} ms |",
            if *q { "on" } else { "off" },
            per.join(", ")
        );
        eprintln!(
            "RESULT {label} {} {med:.3} {p99:.3}",
            if *q { "quickack" } else { "plain" }
        );
    }
}
