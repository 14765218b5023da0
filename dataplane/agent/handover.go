package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/utils/clock"

	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// Agent restarts (docs/architecture.md, "Agent restarts"). A rolling update
// of the DaemonSet stops one agent at a time; an agent that simply went away
// while it was a pair's writer would stop that pair's writes until it is
// back, or fail the pair over if that takes longer than the pair's lease.
// Instead, an agent asked to stop first reports Stopping in every volume's
// status; the controller hands each writer role to the peer when the peer is
// in sync, with the failback's hold, drain and switch, and the agent waits
// for that before it shuts down. Its readiness (/readyz) is false while it
// stops and while it is catching up as a backup, so the DaemonSet does not
// stop the next agent (the peer) before this one can take the writer role.

// Handover defaults (Options.HandoverTimeout, HandoverClientGrace).
const (
	// DefaultHandoverTimeout bounds the wait for the writer roles to move:
	// the controller needs a round or two, and a peer that is resyncing
	// must finish first.
	DefaultHandoverTimeout = 20 * time.Second
	// DefaultHandoverClientGrace is how long the NBD clients of the volumes
	// handed over get to follow the pair's endpoint to the new writer
	// before the agent closes their connections (until then the old writer
	// forwards their requests).
	DefaultHandoverClientGrace = 5 * time.Second
	handoverPoll               = 100 * time.Millisecond
)

// BeginStopping makes every volume's status report Stopping from now on.
func (a *Agent) BeginStopping() { a.stopping.Store(true) }

// status is a volume's status as the control API reports it.
func (a *Agent) status(v *volume.Volume) agentapi.Status {
	st := v.Status()
	st.Stopping = a.stopping.Load()
	ns, name, _ := strings.Cut(st.Name, "/")
	st.Clients = a.clientsOf(st.Name, a.dir(ns, name)).reported()
	return st
}

// handingOver lists the volumes this agent is the writer of and could hand
// over: primary, with the replication link to the peer up (a writer whose
// peer is away keeps its role: there is nobody to hand it to).
func (a *Agent) handingOver() []string {
	var out []string
	for _, v := range a.list() {
		if st := v.Status(); st.Role == agentapi.RolePrimary && st.PeerConnected {
			out = append(out, st.Name)
		}
	}
	return out
}

// notReady says why the agent is not ready, or "" when it is.
func (a *Agent) notReady() string {
	if a.stopping.Load() {
		return "stopping"
	}
	for _, v := range a.list() {
		st := v.Status()
		if st.Role == agentapi.RoleBackup && st.PeerConnected && st.DataState != agentapi.UpToDate {
			return fmt.Sprintf("catching up: %s is %s", st.Name, st.DataState)
		}
	}
	return ""
}

// handleReady serves GET /readyz (no token, like /healthz: the kubelet's
// readiness probe).
func (a *Agent) handleReady(w http.ResponseWriter, _ *http.Request) {
	if why := a.notReady(); why != "" {
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = io.WriteString(w, why+"\n")
		return
	}
	_, _ = io.WriteString(w, "ok\n")
}

// handOver reports Stopping and waits, for at most timeout, until no volume
// is left to hand over; then, for at most clientGrace, until the NBD
// clients have gone (nbdConns counts them). It returns early when ctx is
// done.
func (a *Agent) handOver(ctx context.Context, clk clock.Clock, timeout, clientGrace time.Duration, nbdConns func() int64, log logr.Logger) {
	a.BeginStopping()
	start := clk.Now()
	left := a.handingOver()
	if len(left) == 0 {
		log.Info("Stopping: no writer role to hand over")
		return
	}
	log.Info("Stopping: waiting for the controller to hand the writer roles to the peers", "volumes", left, "timeout", timeout.String())
	wait := func(d time.Duration, done func() bool) bool {
		deadline := clk.Now().Add(d)
		for !done() {
			if !clk.Now().Before(deadline) {
				return false
			}
			select {
			case <-ctx.Done():
				return false
			case <-clk.After(handoverPoll):
			}
		}
		return true
	}
	if !wait(timeout, func() bool { left = a.handingOver(); return len(left) == 0 }) {
		log.Info("Stopping without handing over: the writer roles did not move in time", "volumes", left, "waited", clk.Since(start).String())
		return
	}
	log.Info("Writer roles handed over", "took", clk.Since(start).String())
	if nbdConns == nil || nbdConns() == 0 {
		return
	}
	if wait(clientGrace, func() bool { return nbdConns() == 0 }) {
		log.Info("NBD clients moved to the new writers")
	} else {
		log.Info("Closing the NBD connections still open", "connections", nbdConns())
	}
}
