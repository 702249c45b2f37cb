//! One test fixture for every backend: a real broker the project starts (or none, for the
//! in-memory backend), optionally behind a fault proxy, and a [`Bus`] connected to it the way a
//! service connects, through the facade's registry and `EVENTBUS_*` variables. Built from one
//! typed selector, [`Select`]. The conformance suite runs over it ([`Fixture::harness`]), and so
//! do the reliability rows' single-broker target and the bench's brokers.
//!
//! Adding a backend with a broker of its own: the broker in `eventbus-brokers` (a
//! [`BrokerKind`], a [`Protocol`]), then here one arm in [`broker_vars`] (the variables that
//! point the facade at a broker of that protocol), one in the proxy set-up if its clients can
//! be cut, and one in [`Fixture::harness`] for the broker's quirks.
//!
//! The cargo features (`nats`, `kafka`, `memory`, all on by default) are the facade's: a
//! fixture can connect only the backends its build includes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), String> {
//! use eventbus_brokers::BrokerKind;
//! use eventbus_fixture::{Fixture, Select};
//!
//! // A nats-server behind a fault proxy, the SDK in atomic mode.
//! let fixture = Fixture::start(
//!     Select::Proxied(BrokerKind::Nats),
//!     &[("EVENTBUS_NATS_PUBLISH_MODE", "atomic")],
//! )
//! .await?;
//! let publisher = fixture.bus().publisher().await.map_err(|e| e.to_string())?;
//! fixture.cut(true); // every client connection now hears nothing
//! # drop(publisher); Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eventbus::{Bus, BusConfig, Topic};
use eventbus_brokers::proxy::{FaultProxy, Mode};
use eventbus_brokers::{BrokerKind, Protocol, TestBroker};
use eventbus_conformance::{BackendHarness, Quirks};

/// Which backend, on which broker.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Select {
    /// The in-process memory backend: no broker.
    Memory,
    /// A broker (or cluster) the project starts, and the backend that speaks its protocol.
    Broker(BrokerKind),
    /// A single broker whose every client connection goes through a fault proxy
    /// ([`Fixture::cut`]). A cluster's clients would reconnect around a proxy on one node, so
    /// clusters are refused.
    Proxied(BrokerKind),
    /// A broker the project did not start (yours, or librdkafka's in-process mock cluster),
    /// speaking `protocol` at `address`: no process to fault.
    External(Protocol, String),
}

/// A connected [`Bus`] and what it is connected to, torn down in that order when dropped.
pub struct Fixture {
    // Field order matters: fields drop in order, so the clients close before the proxy and
    // the broker they talk to go away.
    /// `None` with [`Fixture::start_broker`].
    bus: Option<Bus>,
    vars: Vec<(String, String)>,
    /// What clients are given: the proxy's address when there is one; `None` for the memory
    /// backend.
    address: Option<String>,
    /// The broker's protocol; `None` for the memory backend.
    protocol: Option<Protocol>,
    proxy: Option<Arc<FaultProxy>>,
    broker: Option<Box<dyn TestBroker>>,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("backend", &self.bus.as_ref().map(Bus::backend_name))
            .field("broker", &self.broker.as_ref().map(|b| b.describe()))
            .field("proxied", &self.proxy.is_some())
            .finish()
    }
}

/// The variables that point the facade at a broker speaking `protocol` at `address` (every
/// node, comma separated) with `nodes` nodes: one arm per backend.
pub fn broker_vars(protocol: Protocol, address: &str, nodes: usize) -> Vec<(String, String)> {
    let vars: Vec<(&str, String)> = match protocol {
        Protocol::Nats => vec![
            ("EVENTBUS_BACKEND", "nats".into()),
            ("EVENTBUS_NATS_URL", address.into()),
            // One replica per node: R3 on a 3-node cluster.
            ("EVENTBUS_NATS_STREAM_REPLICAS", nodes.to_string()),
        ],
        Protocol::Kafka => vec![
            ("EVENTBUS_BACKEND", "kafka".into()),
            ("EVENTBUS_KAFKA_BROKERS", address.into()),
        ],
    };
    vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Start `kind` off the runtime's threads (a cluster waits seconds for its nodes).
async fn start_broker(kind: BrokerKind) -> Result<Box<dyn TestBroker>, String> {
    let what = format!("{kind:?}");
    tokio::task::spawn_blocking(move || kind.start())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot start {what}: {e}"))
}

/// A single broker of `kind` behind a fault proxy, and the address its clients are given.
async fn start_proxied(
    kind: BrokerKind,
) -> Result<(Box<dyn TestBroker>, Arc<FaultProxy>, String), String> {
    let proxy_err = |e: std::io::Error| format!("fault proxy: {e}");
    match kind {
        BrokerKind::Nats => {
            let broker = start_broker(kind).await?;
            let proxy = FaultProxy::start(loopback(broker.port(0)))
                .await
                .map_err(proxy_err)?;
            let address = format!("nats://{}", proxy.addr());
            Ok((broker, Arc::new(proxy), address))
        }
        BrokerKind::Tansu(storage) => {
            // tansu advertises the proxy's port, so the connections a client opens after the
            // bootstrap (to the broker that metadata names) go through the proxy too.
            let port = eventbus_brokers::free_port().map_err(proxy_err)?;
            let broker = tokio::task::spawn_blocking(move || {
                eventbus_brokers::Tansu::start_advertising(storage, Some(port))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot start tansu: {e}"))?;
            let proxy = FaultProxy::start_on(port, loopback(broker.port()))
                .await
                .map_err(proxy_err)?;
            let address = proxy.addr().to_string();
            Ok((Box::new(broker), Arc::new(proxy), address))
        }
        other => Err(format!(
            "{other:?} behind a fault proxy: only a single broker can be cut this way"
        )),
    }
}

/// `base`, then `extra` on top (a name in both takes `extra`'s value).
fn merge(base: &[(String, String)], extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = base
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .cloned()
        .collect();
    vars.extend_from_slice(extra);
    vars
}

/// Connect a bus from `vars` alone, as a service would from its environment.
async fn connect(vars: &[(String, String)]) -> Result<Bus, String> {
    let config = BusConfig::default()
        .with_vars(vars.iter().map(|(k, v)| (k.as_str(), v.clone())))
        .map_err(|e| format!("bus config: {e}"))?;
    Bus::connect(&config)
        .await
        .map_err(|e| format!("connect: {e}"))
}

impl Fixture {
    /// Start what `select` names and connect a bus to it, with `vars` (`EVENTBUS_*`) on top
    /// of the ones that reach the broker ([`broker_vars`]).
    pub async fn start(select: Select, vars: &[(&str, &str)]) -> Result<Fixture, String> {
        let mut fixture = Self::start_broker(select, vars).await?;
        fixture.bus = Some(connect(&fixture.vars).await?);
        Ok(fixture)
    }

    /// Start what `select` names, without a bus of its own: the caller opens the connections
    /// it wants ([`Fixture::connect_again`], [`Fixture::connect_direct`]), and no idle client
    /// sits behind the proxy.
    pub async fn start_broker(select: Select, vars: &[(&str, &str)]) -> Result<Fixture, String> {
        Ok(match select {
            Select::Memory => Self::assemble(None, None, None, vars),
            Select::Broker(kind) => {
                let broker = start_broker(kind).await?;
                let reached = (broker.protocol(), broker.address());
                Self::assemble(Some(broker), None, Some(reached), vars)
            }
            Select::Proxied(kind) => {
                let (broker, proxy, address) = start_proxied(kind).await?;
                let reached = (broker.protocol(), address);
                Self::assemble(Some(broker), Some(proxy), Some(reached), vars)
            }
            Select::External(protocol, address) => {
                Self::assemble(None, None, Some((protocol, address)), vars)
            }
        })
    }

    /// A fixture without a bus: the variables that reach `reached` (protocol, the address
    /// clients are given), or the memory backend, with `vars` on top.
    fn assemble(
        broker: Option<Box<dyn TestBroker>>,
        proxy: Option<Arc<FaultProxy>>,
        reached: Option<(Protocol, String)>,
        vars: &[(&str, &str)],
    ) -> Fixture {
        let base = match &reached {
            Some((protocol, address)) => {
                broker_vars(*protocol, address, broker.as_ref().map_or(1, |b| b.nodes()))
            }
            None => vec![("EVENTBUS_BACKEND".into(), "memory".into())],
        };
        let extra: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (protocol, address) = reached.unzip();
        Fixture {
            bus: None,
            vars: merge(&base, &extra),
            address,
            protocol,
            proxy,
            broker,
        }
    }

    /// The connected bus. Panics after [`Fixture::start_broker`], which connects none.
    pub fn bus(&self) -> &Bus {
        self.bus
            .as_ref()
            .expect("Fixture::start_broker connects no bus: use connect_again")
    }

    /// The `EVENTBUS_*` variables the bus was connected with: what a program built on the
    /// facade sets to reach the same broker the same way.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// Another bus on a connection of its own, with the same variables (through the proxy
    /// when there is one).
    pub async fn connect_again(&self) -> Result<Bus, String> {
        connect(&self.vars).await
    }

    /// A bus straight to the broker, around the proxy, where the protocol allows it: a NATS
    /// client dials the addresses it is given, so it gets the server's own. A Kafka client
    /// follows the address the broker advertises (the proxy's), so on Kafka, and without a
    /// proxy, this is [`Fixture::connect_again`].
    pub async fn connect_direct(&self) -> Result<Bus, String> {
        match (&self.broker, &self.proxy) {
            (Some(b), Some(_)) if b.protocol() == Protocol::Nats => {
                let own = broker_vars(b.protocol(), &b.address(), b.nodes());
                connect(&merge(&self.vars, &own)).await
            }
            _ => self.connect_again().await,
        }
    }

    /// The address clients are given (the proxy's, with [`Select::Proxied`]); `None` for the
    /// memory backend.
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// The protocol of the broker; `None` for the memory backend.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// The broker, when there is one.
    pub fn broker(&self) -> Option<&dyn TestBroker> {
        self.broker.as_deref()
    }

    /// The broker, to fault its processes.
    pub fn broker_mut(&mut self) -> Option<&mut (dyn TestBroker + 'static)> {
        self.broker.as_deref_mut()
    }

    /// The fault proxy every client connection goes through, with [`Select::Proxied`].
    pub fn proxy(&self) -> Option<&FaultProxy> {
        self.proxy.as_deref()
    }

    /// Cut (`true`: a blackhole, nothing forwarded and nothing closed) or restore (`false`:
    /// every connection reset, then forwarded again) the clients' connections. `false`, doing
    /// nothing, without a proxy.
    pub fn cut(&self, on: bool) -> bool {
        cut(self.proxy.as_deref(), on)
    }

    /// The conformance suite's harness over this fixture's bus, with the broker's quirks, the
    /// topic its backend refuses, and [`Fixture::cut`] as its fault. Panics after
    /// [`Fixture::start_broker`].
    pub fn harness(self) -> BackendHarness<Bus> {
        let tansu = self
            .broker
            .as_ref()
            .is_some_and(|b| b.protocol() == Protocol::Kafka);
        let (quirks, unroutable) = match self.protocol {
            #[cfg(feature = "memory")]
            None => {
                let memory = self
                    .bus()
                    .backend::<eventbus::MemoryBroker>()
                    .expect("no broker: the memory backend");
                memory.block_topic("nowhere");
                (Quirks::default(), "nowhere")
            }
            #[cfg(not(feature = "memory"))]
            None => (Quirks::default(), "nowhere"),
            // A second or more: the ack waits these brokers honour promptly.
            Some(Protocol::Nats) => (
                Quirks::default().min_ack_wait(Duration::from_secs(1)),
                "no.stream.here",
            ),
            // The Kafka brokers this project starts are tansu, and tansu 0.6.0 keeps a departed
            // group leader in one case (see `Quirks::rejoin_after_churn`).
            Some(Protocol::Kafka) => (
                Quirks::default()
                    .min_ack_wait(Duration::from_secs(1))
                    .rejoin_after_churn(!tansu),
                "no-such-topic",
            ),
        };
        let Fixture {
            bus, proxy, broker, ..
        } = self;
        let bus = bus.expect("Fixture::start_broker connects no bus");
        let harness = BackendHarness::new(bus)
            .keep((broker, proxy.clone()))
            .quirks(quirks)
            .unroutable(Topic::new(unroutable));
        match proxy {
            Some(p) => {
                let q = Arc::clone(&p);
                harness.fault(
                    move || {
                        cut(Some(&p), true);
                    },
                    move || {
                        cut(Some(&q), false);
                    },
                )
            }
            None => harness,
        }
    }
}

fn cut(proxy: Option<&FaultProxy>, on: bool) -> bool {
    let Some(p) = proxy else { return false };
    if on {
        p.set(Mode::Hold);
    } else {
        p.reset();
        p.set(Mode::Pass);
    }
    true
}
