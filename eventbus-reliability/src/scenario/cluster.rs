//! Cluster rows: the stream leader stepped down or killed under the raw clients, a rolling restart, a
//! partition through route proxies.

use super::*;

/// NATS cluster only: the stream's leader steps down through the JetStream API twice while 5
/// producers publish (ack deadline 5 s). A planned election must not reach the caller: every
/// first outcome acked (no failed, no unknown), nothing lost, no duplicate.
#[cfg(feature = "nats")]
pub async fn stepdown(t: &mut crate::target::nats_cluster::NatsCluster3, size: Size) -> Row {
    let mut row = Row::new("stepdown", t.name());
    let cfg = BatchConfig::default().ack_timeout(Duration::from_secs(5));
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "stepdown", 5, cfg).await);
    let mut row = stepdown_with(t, &p, (run, topics, filter), size, row).await;
    row.require(
        row.figures.first_failed == 0 && row.figures.first_unknown == 0,
        format!(
            "a step-down reached the caller: {} failed, {} unknown first outcomes",
            row.figures.first_failed, row.figures.first_unknown
        ),
    );
    row.require(row.figures.duplicates == 0, "duplicates stored");
    row
}

/// [`stepdown`] through any publisher `p`, without its assertions on what the caller saw.
#[cfg(feature = "nats")]
pub async fn stepdown_with<P>(
    t: &mut crate::target::nats_cluster::NatsCluster3,
    p: &P,
    (run, topics, filter): (String, Vec<String>, String),
    size: Size,
    mut row: Row,
) -> Row
where
    P: Publisher + InFlight + Clone + Send + Sync + 'static,
{
    let load = paced_load(run, topics, size);
    let script = async {
        let mut events = Vec::new();
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let before = t.wait_for_leader(None, Duration::from_secs(5)).await;
            let at = Instant::now();
            let r = t.step_down().await;
            let after = t.wait_for_leader(before, Duration::from_secs(10)).await;
            events.push((at, before, after, r, at.elapsed()));
        }
        events
    };
    let (events, ledger) = under_load(p, &load, &mut row, script).await;
    let node = |n: &Option<usize>| n.map_or("none".to_owned(), |n| format!("n{n}"));
    for (_, before, after, r, took) in &events {
        if let Err(e) = r {
            row.failures.push(e.clone());
        }
        row.notes.push(format!(
            "leader {} stepped down, new leader {} seen after {} ms",
            node(before),
            node(after),
            ms(*took)
        ));
        row.require(after.is_some(), "no new leader within 10 s");
    }
    fault_times(&mut row, &ledger, events.iter().map(|(at, ..)| *at));
    settle(t, p, &load, &filter, &ledger, &mut row).await;
    row
}

/// A row of the raw client (`backend`, no SDK) under `scenario`: topics provisioned on `t`,
/// the window the SDK's default. `Err` is the row, failed.
async fn raw_setup<T: Target>(
    t: &T,
    scenario: &str,
    backend: &str,
) -> Result<(Row, (String, Vec<String>, String)), Row> {
    let mut row = Row::new(scenario, backend);
    row.window = BatchConfig::default().max_in_flight as u64;
    let run = run_id(&format!("raw-{scenario}"));
    match t.provision(&run, 5).await {
        Ok((topics, filter)) => Ok((row, (run, topics, filter))),
        Err(e) => {
            row.failures.push(format!("provision: {e}"));
            Err(row)
        }
    }
}

/// The raw async-nats client (no SDK) under `scenario` (`kill-restart`, `stepdown`,
/// `kill-connected`, `rolling-restart` or `partition`) on the NATS cluster, with the SDK's
/// window and wire timeout: what a caller sees without the SDK.
/// Only safety is asserted; the caller-visible figures are the comparison.
#[cfg(feature = "nats")]
pub async fn raw_nats(
    t: &mut crate::target::nats_cluster::NatsCluster3,
    scenario: crate::plan::Scenario,
    size: Size,
) -> Row {
    use crate::plan::Scenario;
    let name = scenario.name();
    let (mut row, provisioned) = match raw_setup(t, &name, "nats-cluster raw").await {
        Ok(v) => v,
        Err(row) => return row,
    };
    let config = t.sink_config();
    let p = match crate::raw::RawNats::connect(&config.url, config.ack_timeout, row.window as usize)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            row.failures.push(e);
            return row;
        }
    };
    let mut row = match scenario {
        Scenario::Stepdown => stepdown_with(t, &p, provisioned, size, row).await,
        Scenario::RollingRestart => rolling_restart_with(t, &p, provisioned, size, row).await,
        Scenario::Partition => partition_with(t, &p, provisioned, size, row).await,
        Scenario::KillConnected => {
            t.aim(crate::target::nats_cluster::Aim::ClientNode);
            kill_restart_with(t, &p, provisioned, size, row).await
        }
        _ => kill_restart_with(t, &p, provisioned, size, row).await,
    };
    if let Some(v) = t.last_victim() {
        row.notes.push(format!("the faults hit node n{v}"));
    }
    row
}

/// rdkafka's `FutureProducer` (no SDK) through `kill-restart` on the tansu cluster, its
/// `message.timeout.ms` the SDK row's ack deadline. Only safety is asserted.
#[cfg(feature = "kafka")]
pub async fn raw_kafka(t: &mut crate::target::kafka_cluster::TansuCluster3, size: Size) -> Row {
    let (mut row, provisioned) = match raw_setup(t, "kill-restart", "kafka-cluster raw").await {
        Ok(v) => v,
        Err(row) => return row,
    };
    match crate::raw::RawKafka::connect(&t.bootstrap(), t.kill_deadline()) {
        Ok(p) => {
            let mut row = kill_restart_with(t, &p, provisioned, size, row).await;
            row.notes.push(t.kill_note());
            row
        }
        Err(e) => {
            row.failures.push(e);
            row
        }
    }
}

/// NATS cluster only: every node restarted in turn, as an operator rolls an upgrade (SIGTERM,
/// start on the same store, wait until every node reports healthy, then the next), while 5
/// producers publish a paced load of about 15 s (ack deadline 10 s). Nothing may reach the
/// caller as failed; nothing is lost or duplicated.
#[cfg(feature = "nats")]
pub async fn rolling_restart(t: &mut crate::target::nats_cluster::NatsCluster3, size: Size) -> Row {
    let mut row = Row::new("rolling-restart", t.name());
    let cfg = BatchConfig::default().ack_timeout(Duration::from_secs(10));
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "rolling", 5, cfg).await);
    let mut row = rolling_restart_with(t, &p, (run, topics, filter), size, row).await;
    require_no_failed(&mut row, "a rolling restart");
    row
}

/// [`rolling_restart`] through any publisher `p`, without its assertions on what the caller
/// saw.
#[cfg(feature = "nats")]
pub async fn rolling_restart_with<P>(
    t: &mut crate::target::nats_cluster::NatsCluster3,
    p: &P,
    (run, topics, filter): (String, Vec<String>, String),
    size: Size,
    mut row: Row,
) -> Row
where
    P: Publisher + InFlight + Clone + Send + Sync + 'static,
{
    let load = spread_load(run, topics, if size.quick { 1_200 } else { 6_000 }, 600);
    let script = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        let downs = blocking(|| t.rolling_restart()).await;
        (downs, start.elapsed())
    };
    let ((downs, took), ledger) = under_load(p, &load, &mut row, script).await;
    match downs {
        Ok(downs) => {
            row.notes
                .push(format!("3 nodes restarted in turn in {} ms", ms(took)));
            fault_times(&mut row, &ledger, downs.into_iter());
        }
        Err(e) => row.failures.push(e),
    }
    settle(t, p, &load, &filter, &ledger, &mut row).await;
    row
}

/// NATS cluster only (started with route proxies): the node that leads the stream is cut off
/// from the other two (its route proxies hold every byte, no RST) for 10 s (5 s quick) while
/// 5 producers publish a paced load of about 12.5 s (ack deadline 20 s), then the partition
/// heals. The majority elects a new leader once its raft election timeout (4-9 s) passes; a
/// client attached to the cut-off node cannot reach it until the partition heals. Safety is
/// asserted; what the caller saw is reported.
#[cfg(feature = "nats")]
pub async fn partition(t: &mut crate::target::nats_cluster::NatsCluster3, size: Size) -> Row {
    let mut row = Row::new("partition", t.name());
    let cfg = BatchConfig::default().ack_timeout(Duration::from_secs(20));
    let (run, topics, filter, p) = try_setup!(row, setup(t, &mut row, "partition", 5, cfg).await);
    let mut row = partition_with(t, &p, (run, topics, filter), size, row).await;
    row.require(row.figures.duplicates == 0, "duplicates stored");
    row
}

/// [`partition`] through any publisher `p`, without its assertion on duplicates.
#[cfg(feature = "nats")]
pub async fn partition_with<P>(
    t: &mut crate::target::nats_cluster::NatsCluster3,
    p: &P,
    (run, topics, filter): (String, Vec<String>, String),
    size: Size,
    mut row: Row,
) -> Row
where
    P: Publisher + InFlight + Clone + Send + Sync + 'static,
{
    let hold = Duration::from_secs(if size.quick { 5 } else { 10 });
    let load = spread_load(run, topics, if size.quick { 500 } else { 2_500 }, 500);
    let client_node = t.client_node();
    let script = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let victim = t.choose_victim();
        let at = Instant::now();
        let cut = t.partition(victim);
        let elected = t.wait_for_leader(Some(victim), hold).await;
        tokio::time::sleep(hold.saturating_sub(at.elapsed())).await;
        t.heal(victim);
        (victim, at, cut, elected)
    };
    let ((victim, at, cut, elected), ledger) = under_load(p, &load, &mut row, script).await;
    row.require(cut, "the cluster has no route proxies to cut");
    let node = |n: Option<usize>| n.map_or("none".to_owned(), |n| format!("n{n}"));
    row.notes.push(format!(
        "stream leader n{victim} cut off for {} s; the client was attached to {}; new leader during the partition: {}",
        hold.as_secs(),
        node(client_node),
        node(elected)
    ));
    fault_times(&mut row, &ledger, std::iter::once(at));
    settle(t, p, &load, &filter, &ledger, &mut row).await;
    row
}
