//! The stream shape shared by `Destination.ClientPolicy` and
//! `Policy.ServerPolicy`: one task per stream sends the whole answer, then
//! waits for a change of any index topic the answer depends on, recomputes
//! it, and sends it again only when it differs from what that stream was
//! last sent. A client that goes away ends the task.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::index::{self, Index};

/// The stream handed to tonic: messages produced by the stream's task.
pub struct UpdateStream<T>(pub(crate) mpsc::Receiver<Result<T, Status>>);

impl<T> Stream for UpdateStream<T> {
    type Item = Result<T, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// The per-stream metrics: open streams, and answers sent.
#[derive(Clone)]
pub struct StreamMetrics {
    pub open: Gauge,
    pub sent: Counter,
}

/// Streams `compute(&index)` (an answer and receivers for the topics it
/// depends on, read atomically: see [`Index::resolve`]) and every later
/// different answer.
pub fn watch_answers<T, F>(index: Index, metrics: StreamMetrics, compute: F) -> UpdateStream<T>
where
    T: PartialEq + Clone + Send + Sync + 'static,
    F: Fn(&Index) -> (T, Vec<watch::Receiver<u64>>) + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(4);
    tokio::spawn(async move {
        metrics.open.inc();
        let mut last: Option<T> = None;
        loop {
            let (answer, mut topics) = compute(&index);
            if last.as_ref() != Some(&answer) {
                metrics.sent.inc();
                if tx.send(Ok(answer.clone())).await.is_err() {
                    break;
                }
                last = Some(answer);
            }
            tokio::select! {
                alive = index::changed(&mut topics) => if !alive { break },
                () = tx.closed() => break,
            }
        }
        metrics.open.dec();
    });
    UpdateStream(rx)
}
