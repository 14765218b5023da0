package v1alpha1

import (
	"crypto/sha256"
	"encoding/hex"
	"time"
)

// Names, labels and annotations of the objects Tandem's components share
// through the API server. The agent's Lease and the per-pair authority Lease
// live in the operator's namespace; the authority Lease's name and
// annotations are defined by package internal/authority.
const (
	// AnnControlEndpoint on an agent Lease: base URL of its control API.
	AnnControlEndpoint = "storage.tandem.dev/control-endpoint"
	// AnnReplicationEndpoint on an agent Lease: host:port of its replication listener.
	AnnReplicationEndpoint = "storage.tandem.dev/replication-endpoint"
	// AnnNBDEndpoint on an agent Lease: host:port of its NBD server.
	AnnNBDEndpoint = "storage.tandem.dev/nbd-endpoint"
	// AnnDataDir on an agent Lease: the agent's data directory on its node
	// (replicas live in <dir>/volumes/<namespace>/<name>/), so a teardown
	// that cannot reach the agent can say where files were left.
	AnnDataDir = "storage.tandem.dev/data-dir"
	// AnnFreeBytes and AnnCapacityBytes on an agent Lease: free and total
	// bytes of the filesystem holding the agent's data directory, as of the
	// last renewal (the CSI controller places volumes with them).
	AnnFreeBytes     = "storage.tandem.dev/free-bytes"
	AnnCapacityBytes = "storage.tandem.dev/capacity-bytes"
	// AnnRetainData on a VolumePair: "true" keeps the replicas' files when
	// the VolumePair is deleted (default: deleted).
	AnnRetainData = "storage.tandem.dev/retain-data"

	// LabelComponent is "agent" on agent Leases and "authority" on authority Leases.
	LabelComponent = "storage.tandem.dev/component"
	// LabelNode names the agent's node on its Lease.
	LabelNode = "storage.tandem.dev/node"

	// Finalizer tears a pair down on its agents before the object goes.
	Finalizer = "storage.tandem.dev/teardown"
)

// NodePluginLeaseName is the name of the Lease the CSI node plugin renews as
// its heartbeat.
func NodePluginLeaseName(node string) string { return shortName("tandem-csi-node-", node) }

// AgentLeaseName is the name of the Lease an agent renews as its heartbeat.
func AgentLeaseName(node string) string { return shortName("tandem-agent-", node) }

// The per-pair authority Leases (their names, annotations and protocol)
// belong to package internal/authority: api stays free of client code.

// shortName keeps names within 63 characters, hashing long ones.
func shortName(prefix, s string) string {
	n := prefix + s
	if len(n) <= 63 {
		return n
	}
	sum := sha256.Sum256([]byte(s))
	return n[:63-11] + "-" + hex.EncodeToString(sum[:])[:10]
}

// ForcePromoteTTL is how long a storage.tandem.dev/force-promote request
// that cannot act (the member unreachable, the writer's authority not
// expired) waits before the controller clears it: a decision that discards
// writes is not carried out hours later on what was known when it was made.
const ForcePromoteTTL = 10 * time.Minute
