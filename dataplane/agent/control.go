package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"

	"github.com/tandem-storage/tandem/dataplane/bitmap"
	"github.com/tandem-storage/tandem/dataplane/meta"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

var (
	errNotFound = errors.New("not found")
	errConflict = errors.New("conflict")
)

// SetAddresses records the listen addresses reported by /v1/info.
func (a *Agent) SetAddresses(nbdAddr, replAddr, controlAddr string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.nbdAddr, a.replAddr, a.controlAddr = nbdAddr, replAddr, controlAddr
}

// ControlLimits bound the control API's connections, so that idle, slow or
// abusive clients (the port is reachable from the cluster network, and the
// token is only checked once a request's headers are in) cannot pile up
// goroutines and buffers in the agent. Zero fields take the defaults.
type ControlLimits struct {
	// ReadHeaderTimeout bounds reading a request's headers (default 10 s);
	// ReadTimeout the whole request, body included (default 30 s; bodies
	// are at most 1 MiB of JSON).
	ReadHeaderTimeout, ReadTimeout time.Duration
	// WriteTimeout bounds a request from the end of its headers to the end
	// of its response (default 2 min: a checksum call may read 4096
	// regions of the replica).
	WriteTimeout time.Duration
	// IdleTimeout closes keep-alive connections idle this long (default
	// 2 min; the controller probes every agent each second or so).
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds a request's headers (default 64 KiB).
	MaxHeaderBytes int
	// MaxConns bounds the connections served at once (default 256); more
	// wait in the listen backlog until one closes.
	MaxConns int
}

// Control API defaults (see ControlLimits).
const (
	DefaultControlReadHeaderTimeout = 10 * time.Second
	DefaultControlReadTimeout       = 30 * time.Second
	DefaultControlWriteTimeout      = 2 * time.Minute
	DefaultControlIdleTimeout       = 2 * time.Minute
	DefaultControlMaxHeaderBytes    = 64 << 10
	DefaultControlMaxConns          = 256
)

func (l ControlLimits) withDefaults() ControlLimits {
	def := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&l.ReadHeaderTimeout, DefaultControlReadHeaderTimeout)
	def(&l.ReadTimeout, DefaultControlReadTimeout)
	def(&l.WriteTimeout, DefaultControlWriteTimeout)
	def(&l.IdleTimeout, DefaultControlIdleTimeout)
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = DefaultControlMaxHeaderBytes
	}
	if l.MaxConns <= 0 {
		l.MaxConns = DefaultControlMaxConns
	}
	return l
}

// ServeControl serves the control API on ln, within lim, until ctx is done
// (over TLS with Config.TLS);
// then it stops accepting and gives the requests in progress up to 5 s to
// finish. It returns nil after such a shutdown, or the error that ended
// serving.
func (a *Agent) ServeControl(ctx context.Context, ln net.Listener, lim ControlLimits) error {
	lim = lim.withDefaults()
	srv := &http.Server{
		Handler:           a.Handler(),
		ReadHeaderTimeout: lim.ReadHeaderTimeout,
		ReadTimeout:       lim.ReadTimeout,
		WriteTimeout:      lim.WriteTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    lim.MaxHeaderBytes,
		ErrorLog:          log.New(logrWriter{a.log.WithName("http")}, "", 0),
	}
	done := make(chan struct{})
	stopped := context.AfterFunc(ctx, func() {
		defer close(done)
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			a.log.Error(err, "Control API shutdown")
		}
	})
	ln = netutil.LimitListener(ln, lim.MaxConns)
	if a.cfg.TLS != nil {
		// A client certificate is optional at the handshake (probes have
		// none); auth requires one for /v1 (controlIdentityOK).
		ln = tls.NewListener(ln, a.cfg.TLS.ServerConfig(false))
	}
	err := srv.Serve(ln)
	if !stopped() {
		<-done
	}
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("control API: %w", err)
}

// logrWriter makes net/http's error log (TLS handshake errors, accept
// retries, panics in handlers) go to the agent's log.
type logrWriter struct{ log logr.Logger }

func (w logrWriter) Write(p []byte) (int, error) {
	w.log.Info(strings.TrimSpace(string(p)))
	return len(p), nil
}

// Handler returns the control API.
func (a *Agent) Handler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(a.MetricsCollectors()...)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	mux.HandleFunc("GET /readyz", a.handleReady)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /v1/info", a.auth(a.handleInfo))
	mux.HandleFunc("GET /v1/volumes", a.auth(a.handleList))
	mux.HandleFunc("PUT /v1/volumes/{ns}/{name}", a.auth(a.handlePut))
	mux.HandleFunc("GET /v1/volumes/{ns}/{name}", a.auth(a.handleGet))
	mux.HandleFunc("DELETE /v1/volumes/{ns}/{name}", a.auth(a.handleDelete))
	mux.HandleFunc("POST /v1/volumes/{ns}/{name}/peer-outdated", a.auth(a.handlePeerOutdated))
	mux.HandleFunc("GET /v1/volumes/{ns}/{name}/bitmap", a.auth(a.handleBitmap))
	mux.HandleFunc("GET /v1/volumes/{ns}/{name}/checksums", a.auth(a.handleChecksums))
	mux.HandleFunc("POST /v1/volumes/{ns}/{name}/resync", a.auth(a.handleResync))
	return mux
}

// MetricsCollectors returns what the agent's /metrics serves: its volumes'
// and its own metrics, Go's runtime and the process. The chart's alerts and
// dashboard are checked against them (test/monitoring).
func (a *Agent) MetricsCollectors() []prometheus.Collector {
	return []prometheus.Collector{&collector{a: a}, tlsCollector{a: a}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})}
}

func (a *Agent) auth(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || !a.tokenOK(tok) {
			a.log.Info("Refused control API call: wrong or missing token", "remote", r.RemoteAddr, "path", r.URL.Path)
			w.Header().Set("WWW-Authenticate", `Bearer realm="tandem-agent"`)
			writeErr(w, http.StatusUnauthorized, errors.New("authentication required: send Authorization: Bearer <token>"))
			return
		}
		if reason := a.controlIdentityOK(r); reason != "" {
			a.log.Info("Refused control API call: "+reason, "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
			writeErr(w, http.StatusForbidden, errors.New(reason))
			return
		}
		h(w, r)
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, agentapi.ErrorBody{Error: err.Error()})
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode request body: %w", err)
	}
	return nil
}

func (a *Agent) handleInfo(w http.ResponseWriter, _ *http.Request) {
	a.mu.Lock()
	info := agentapi.Info{Node: a.cfg.Node, NBDAddress: a.nbdAddr, ReplicationAddress: a.replAddr, ControlAddress: a.controlAddr, Volumes: len(a.volumes)}
	a.mu.Unlock()
	a.tlsInfo(&info)
	writeJSON(w, http.StatusOK, info)
}

func (a *Agent) handleList(w http.ResponseWriter, _ *http.Request) {
	out := []agentapi.Status{}
	for _, v := range a.list() {
		out = append(out, a.status(v))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *Agent) handlePut(w http.ResponseWriter, r *http.Request) {
	ns, name := r.PathValue("ns"), r.PathValue("name")
	if err := ValidName(ns, name); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	var req agentapi.VolumeRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if err := validGeometry(req.Size, req.RegionSize); err != nil {
		// Refused before anything is created on disk: a replica that
		// fails to open half-way could leave files behind.
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	v, err := a.open(ns, name, req.Size, req.RegionSize)
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, errConflict):
			code = http.StatusConflict
		case errors.Is(err, syscall.EFBIG), errors.Is(err, volume.ErrGrowLimit):
			// Larger than this node's file system can hold, or than a
			// grown replica's journal can number.
			code = http.StatusBadRequest
		}
		writeErr(w, code, err)
		return
	}
	// The client restriction is in force (and durable) before the volume
	// plays a new role: a new writer never serves a fenced client.
	if err := a.setClients(ns+"/"+name, a.dir(ns, name), req.Spec.Clients); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if err := v.Apply(req.Spec); err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	if k, ok := a.cfg.Authority.(interface{ Kick() }); ok && req.Spec.Role == agentapi.RolePrimary {
		k.Kick()
	}
	writeJSON(w, http.StatusOK, a.status(v))
}

// validGeometry checks a request's size and region size against what the
// replica's metadata and bitmaps can hold.
func validGeometry(size, regionSize int64) error {
	if size <= 0 || regionSize <= 0 {
		return fmt.Errorf("size (%d) and regionSize (%d) must be positive", size, regionSize)
	}
	if regionSize < meta.MinRegionSize || regionSize > meta.MaxRegionSize || regionSize&(regionSize-1) != 0 {
		return fmt.Errorf("regionSize %d: must be a power of two in [%d, %d]", regionSize, meta.MinRegionSize, meta.MaxRegionSize)
	}
	if err := bitmap.ValidateGeometry(size, regionSize, 0); err != nil {
		return err
	}
	return nil
}

func (a *Agent) handleGet(w http.ResponseWriter, r *http.Request) {
	v := a.get(r.PathValue("ns") + "/" + r.PathValue("name"))
	if v == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no volume %s/%s on node %s", r.PathValue("ns"), r.PathValue("name"), a.cfg.Node))
		return
	}
	writeJSON(w, http.StatusOK, a.status(v))
}

func (a *Agent) handleDelete(w http.ResponseWriter, r *http.Request) {
	ns, name := r.PathValue("ns"), r.PathValue("name")
	if err := ValidName(ns, name); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if err := a.remove(ns, name, r.URL.Query().Get("purge") == "true"); err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, errNotFound) {
			code = http.StatusNotFound
		}
		writeErr(w, code, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *Agent) handlePeerOutdated(w http.ResponseWriter, r *http.Request) {
	v := a.get(r.PathValue("ns") + "/" + r.PathValue("name"))
	if v == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no volume %s/%s on node %s", r.PathValue("ns"), r.PathValue("name"), a.cfg.Node))
		return
	}
	var req agentapi.PeerOutdatedRequest
	if err := decode(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	var nodes []string
	if req.Node != "" {
		nodes = append(nodes, req.Node)
	}
	if err := v.PeerOutdated(req.Epoch, nodes...); err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	writeJSON(w, http.StatusOK, a.status(v))
}

// collector exports every volume's status as Prometheus metrics.
type collector struct{ a *Agent }

var (
	labels       = []string{"volume", "role", "data_state"}
	descUp       = prometheus.NewDesc("tandem_volume_writable", "1 when this member accepts client writes.", labels, nil)
	descEpoch    = prometheus.NewDesc("tandem_volume_epoch", "Authority epoch of the member.", labels, nil)
	descPeer     = prometheus.NewDesc("tandem_volume_peer_connected", "1 when the replication link is up.", labels, nil)
	descOOS      = prometheus.NewDesc("tandem_volume_out_of_sync_bytes", "Bytes in dirty regions: what the peer may lack.", labels, nil)
	descOldest   = prometheus.NewDesc("tandem_volume_oldest_unreplicated_seconds", "Age of the oldest write the peer does not hold (unacknowledged, or written while it was away and not yet resynced).", labels, nil)
	descCopyDone = prometheus.NewDesc("tandem_volume_resync_copied_bytes_total", "Bytes sent by resyncs.", labels, nil)
	descWrites   = prometheus.NewDesc("tandem_volume_writes_total", "Client writes.", labels, nil)
	descWBytes   = prometheus.NewDesc("tandem_volume_write_bytes_total", "Client bytes written.", labels, nil)
	descReads    = prometheus.NewDesc("tandem_volume_reads_total", "Client reads.", labels, nil)
	descRecon    = prometheus.NewDesc("tandem_volume_link_reconnects_total", "Replication link reconnects.", labels, nil)
	descRejected = prometheus.NewDesc("tandem_volume_rejected_frames_total", "Replication frames or streams refused (epoch, range, role).", labels, nil)
	descHold     = prometheus.NewDesc("tandem_volume_last_write_hold_seconds", "Duration of the last failback write hold.", labels, nil)
	descWaiting  = prometheus.NewDesc("tandem_volume_writes_waiting_peer_outdated", "Sync writes held until the peer is recorded Outdated.", labels, nil)
)

// Agent-wide metrics: the in-flight budget and the replication listener.
var (
	descBudget      = prometheus.NewDesc("tandem_agent_inflight_budget_bytes", "The agent's memory budget for in-flight request data (--max-inflight-bytes).", nil, nil)
	descBudgetUsed  = prometheus.NewDesc("tandem_agent_inflight_bytes", "In-flight request data charged to the budget now.", nil, nil)
	descBudgetWait  = prometheus.NewDesc("tandem_agent_inflight_waiting_requests", "Requests waiting for room in the in-flight budget now.", nil, nil)
	descBudgetWaits = prometheus.NewDesc("tandem_agent_inflight_waits_total", "Requests that had to wait for room in the in-flight budget.", nil, nil)
	descReplConns   = prometheus.NewDesc("tandem_agent_replication_connections", "Replication connections open, by state (handshaking: token not checked yet).", []string{"state"}, nil)
	descReplRefused = prometheus.NewDesc("tandem_agent_replication_connections_refused_total", "Replication connections closed at once because a connection limit was reached.", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descUp, descEpoch, descPeer, descOOS, descOldest, descCopyDone, descWrites, descWBytes, descReads, descRecon, descRejected, descHold, descWaiting,
		descBudget, descBudgetUsed, descBudgetWait, descBudgetWaits, descReplConns, descReplRefused} {
		ch <- d
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	if b := a.cfg.Budget; b != nil {
		st := b.Stats()
		ch <- prometheus.MustNewConstMetric(descBudget, prometheus.GaugeValue, float64(st.Size))
		ch <- prometheus.MustNewConstMetric(descBudgetUsed, prometheus.GaugeValue, float64(st.InUse))
		ch <- prometheus.MustNewConstMetric(descBudgetWait, prometheus.GaugeValue, float64(st.Waiting))
		ch <- prometheus.MustNewConstMetric(descBudgetWaits, prometheus.CounterValue, float64(st.Waits))
	}
	hs := a.replHandshakes.Load()
	ch <- prometheus.MustNewConstMetric(descReplConns, prometheus.GaugeValue, float64(hs), "handshaking")
	ch <- prometheus.MustNewConstMetric(descReplConns, prometheus.GaugeValue, float64(max(0, a.replConns.Load()-hs)), "authenticated")
	ch <- prometheus.MustNewConstMetric(descReplRefused, prometheus.CounterValue, float64(a.replRefused.Load()))
	for _, v := range c.a.list() {
		s := v.Status()
		l := []string{s.Name, string(s.Role), string(s.DataState)}
		g := func(d *prometheus.Desc, val float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, val, l...)
		}
		ctr := func(d *prometheus.Desc, val int64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(val), l...)
		}
		g(descUp, b2f(s.Writable))
		g(descEpoch, float64(s.Epoch))
		g(descPeer, b2f(s.PeerConnected))
		g(descOOS, float64(s.OutOfSyncBytes))
		g(descOldest, s.OldestUnreplicatedSeconds)
		g(descHold, s.LastHoldSeconds)
		g(descWaiting, float64(s.WaitingForPeerOutdated))
		ctr(descCopyDone, s.Copy.CopiedBytesTotal)
		ctr(descWrites, s.Counters.Writes)
		ctr(descWBytes, s.Counters.WriteBytes)
		ctr(descReads, s.Counters.Reads)
		ctr(descRecon, s.Counters.Reconnects)
		ctr(descRejected, s.Counters.RejectedFrames)
	}
}

func (a *Agent) handleBitmap(w http.ResponseWriter, r *http.Request) {
	v := a.get(r.PathValue("ns") + "/" + r.PathValue("name"))
	if v == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("no volume %s/%s on node %s", r.PathValue("ns"), r.PathValue("name"), a.cfg.Node))
		return
	}
	writeJSON(w, http.StatusOK, agentapi.Bitmap{RegionSize: v.Status().RegionSize, Runs: v.DirtyRanges()})
}
