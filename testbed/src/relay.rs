//! [`Relay`]: a loopback TCP relay a test owns, standing for a network link
//! it can cut and restore — a device's connection to NATS, a site's uplink.
//! Cutting closes every connection through it and refuses new ones until
//! [`Relay::restore`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
pub struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    /// Bumped on every cut: each connection closes when it changes.
    cuts: watch::Sender<u64>,
    _runtime: std::thread::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Relay {
    /// Relays a free loopback port to `target`, on a thread of its own (so
    /// it keeps relaying whatever the test's runtime does).
    pub fn start(target: SocketAddr) -> Self {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port for the relay");
        std_listener.set_nonblocking(true).expect("non-blocking");
        let port = std_listener.local_addr().expect("its address").port();
        let up = Arc::new(AtomicBool::new(true));
        let (cuts, cut_rx) = watch::channel(0u64);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let flag = up.clone();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the relay's runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("a tokio listener");
                loop {
                    let (inbound, _) = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok(a) => a,
                            Err(_) => continue,
                        },
                    };
                    if !flag.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let mut cut = cut_rx.clone();
                    cut.borrow_and_update();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (mut a, mut b) = (inbound, outbound);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            });
        });
        Self {
            port,
            up,
            cuts,
            _runtime: runtime,
            stop: Some(stop),
        }
    }

    /// The relay's own port (what a client is given instead of the target's).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<relay port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Cuts the link: every connection through it closes, new ones are
    /// refused.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Restores the link: new connections go through again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
