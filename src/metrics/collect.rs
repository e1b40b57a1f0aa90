//! The series read at scrape time from what the daemon keeps anyway: the view's sizes and
//! refused records, the name server's and the Docker plugin's counters, the networks whose
//! programming fails, and the reconcile counts named after their networks. Nothing here is
//! counted twice: `vxnet info` shows the same numbers.

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::cluster::LeaseSource;
use crate::docker::plugin::DockerPlugin;
use crate::model::NodeId;
use crate::node::Membership;
use crate::reconcile::Reconciler;
use crate::validate::RecordKind;
use crate::view::SharedView;

/// What the collector reads from.
#[derive(Clone)]
pub struct DaemonCollector {
    pub node_id: NodeId,
    pub view: SharedView,
    pub reconciler: Arc<Reconciler>,
    pub membership: Arc<Membership>,
    pub docker_plugin: Option<Arc<DockerPlugin>>,
}

impl fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonCollector")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

const RECORD_KINDS: [RecordKind; 3] = [RecordKind::Node, RecordKind::Network, RecordKind::Endpoint];

/// One view read, so that the series of a scrape agree with each other.
struct ViewNumbers {
    revision: i64,
    networks: usize,
    local_endpoints: usize,
    remote_endpoints: usize,
    nodes: usize,
    rejected_total: Vec<(RecordKind, u64)>,
    refused_now: Vec<(RecordKind, usize)>,
    /// Network ID → (name, 12-digit short ID), for the reconcile series.
    names: std::collections::HashMap<String, (String, String)>,
}

impl DaemonCollector {
    fn view_numbers(&self) -> ViewNumbers {
        self.view.with(|v| {
            let local_endpoints = v
                .endpoints
                .values()
                .flat_map(|eps| eps.values())
                .filter(|e| e.node_id == self.node_id)
                .count();
            let all: usize = v.endpoints.values().map(|eps| eps.len()).sum();
            let by_kind = v.rejections_by_kind();
            ViewNumbers {
                revision: v.revision,
                networks: v.networks.len(),
                local_endpoints,
                remote_endpoints: all - local_endpoints,
                nodes: v.nodes.len(),
                rejected_total: RECORD_KINDS
                    .iter()
                    .map(|k| (*k, by_kind.get(k).copied().unwrap_or(0)))
                    .collect(),
                refused_now: RECORD_KINDS
                    .iter()
                    .map(|k| (*k, v.rejected().values().filter(|r| r.kind == *k).count()))
                    .collect(),
                names: v
                    .networks
                    .values()
                    .map(|n| {
                        (
                            n.network.id.to_string(),
                            (n.network.name.clone(), n.network.id.short().to_string()),
                        )
                    })
                    .collect(),
            }
        })
    }
}

/// One series with no labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: impl EncodeMetric,
) -> fmt::Result {
    let e = encoder.encode_descriptor(name, help, unit, metric.metric_type())?;
    metric.encode(e)
}

fn gauge(v: usize) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl prometheus_client::collector::Collector for DaemonCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let v = self.view_numbers();
        let registered = self.membership.current_lease().is_some();
        single(
            &mut encoder,
            "registered",
            "1 while this daemon holds a live lease in the cluster store",
            None,
            ConstGauge::new(i64::from(registered)),
        )?;
        single(
            &mut encoder,
            "view_revision",
            "The cluster store revision this daemon's view has reached (0: not listed yet)",
            None,
            ConstGauge::new(v.revision),
        )?;
        single(
            &mut encoder,
            "watch_lag",
            "Seconds since the cluster store's watch last delivered events or answered a \
             progress request (asked after 5 s of quiet): grows while the watch is broken or stuck",
            Some(&Unit::Seconds),
            ConstGauge::new(super::watch_silence().as_secs_f64()),
        )?;
        single(
            &mut encoder,
            "networks",
            "Networks in this daemon's view of the cluster",
            None,
            gauge(v.networks),
        )?;
        {
            let mut fam = encoder.encode_descriptor(
                "endpoints",
                "Endpoints in this daemon's view, on this host (local) or on others (remote)",
                None,
                MetricType::Gauge,
            )?;
            for (location, n) in [("local", v.local_endpoints), ("remote", v.remote_endpoints)] {
                gauge(n).encode(fam.encode_family(&[("location", location)])?)?;
            }
        }
        single(
            &mut encoder,
            "nodes",
            "Hosts registered in the cluster store, as this daemon's view has them",
            None,
            gauge(v.nodes),
        )?;
        {
            let mut fam = encoder.encode_descriptor(
                "store_records_rejected",
                "Store records refused at admission since start-up (re-puts of a bad record \
                 included), by kind of record",
                None,
                MetricType::Counter,
            )?;
            for (kind, n) in &v.rejected_total {
                ConstCounter::new(*n).encode(fam.encode_family(&[("kind", kind.to_string())])?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "store_records_refused",
                "Store records refused now (listed by `vxnet info`), by kind of record",
                None,
                MetricType::Gauge,
            )?;
            for (kind, n) in &v.refused_now {
                gauge(*n).encode(fam.encode_family(&[("kind", kind.to_string())])?)?;
            }
        }
        self.encode_reconcile(&mut encoder, &v)?;
        self.encode_dns(&mut encoder)?;
        self.encode_docker(&mut encoder)
    }
}

impl DaemonCollector {
    fn encode_reconcile(&self, encoder: &mut DescriptorEncoder, v: &ViewNumbers) -> fmt::Result {
        // Only networks still in the view: a removed network's series go with it, which
        // bounds them by the networks this host has programmed and that still exist.
        let counts = super::reconcile_counts(|id| v.names.contains_key(id));
        let rows: Vec<_> = counts
            .iter()
            .filter_map(|(id, kinds)| v.names.get(id).map(|names| (names, kinds)))
            .collect();
        for (name, help, errors) in [
            (
                "reconcile_runs",
                "Reconciles of a network on this host: full (kernel read back and fixed) or \
                 peers (a watch event's FDB/neighbour changes applied)",
                false,
            ),
            (
                "reconcile_errors",
                "Reconciles of a network on this host that failed (each is retried alone, \
                 with backoff)",
                true,
            ),
        ] {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((net_name, short), kinds) in &rows {
                for (kind, c) in kinds.iter() {
                    let labels = [
                        ("network", net_name.as_str()),
                        ("network_id", short.as_str()),
                        ("kind", kind.as_str()),
                    ];
                    let n = if errors { c.errors } else { c.runs };
                    ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        single(
            encoder,
            "reconcile_failing_networks",
            "Networks whose programming is failing on this host now (`vxnet info` names them)",
            None,
            gauge(self.reconciler.network_errors().len()),
        )
    }

    fn encode_dns(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(dns) = self.reconciler.dns() else {
            return Ok(());
        };
        let info = dns.info();
        {
            let mut fam = encoder.encode_descriptor(
                "dns_queries",
                "Queries to the name server, by what became of them: answered from the view, \
                 forwarded to the host's resolvers, dropped as from no local endpoint \
                 (unknown_source) or over the asker's rate (rate_limited)",
                None,
                MetricType::Counter,
            )?;
            for (result, n) in [
                ("answered", info.answered),
                ("forwarded", info.forwarded),
                ("unknown_source", info.unknown_source),
                ("rate_limited", info.rate_limited),
            ] {
                ConstCounter::new(n).encode(fam.encode_family(&[("result", result)])?)?;
            }
        }
        single(
            encoder,
            "dns_forwards_shed",
            "Forwarded queries answered SERVFAIL because too many forwards were in flight",
            None,
            ConstCounter::new(info.forwards_shed),
        )?;
        single(
            encoder,
            "dns_names",
            "(network, name) entries the name server answers for",
            None,
            gauge(info.names),
        )
    }

    fn encode_docker(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(plugin) = &self.docker_plugin else {
            return Ok(());
        };
        // The plugin counts only calls of its protocols: a bounded set of labels.
        let calls = plugin.call_stats();
        {
            let mut fam = encoder.encode_descriptor(
                "docker_plugin_requests",
                "Docker network and IPAM plugin calls served, by call",
                None,
                MetricType::Counter,
            )?;
            for (call, s) in &calls {
                ConstCounter::new(s.count)
                    .encode(fam.encode_family(&[("call", call.as_str())])?)?;
            }
        }
        let mut fam = encoder.encode_descriptor(
            "docker_plugin_request_duration",
            "Time spent serving Docker plugin calls, by call (divide by the requests for the mean)",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for (call, s) in &calls {
            ConstCounter::new(s.total_us as f64 / 1e6)
                .encode(fam.encode_family(&[("call", call.as_str())])?)?;
        }
        Ok(())
    }
}
