package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/cli-runtime/pkg/printers"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
	agenttoken "github.com/tandem-storage/tandem/internal/token"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// How the plugin finds and authenticates to the agents: it finds the agents'
// DaemonSet by its labels (--agent-selector), in --operator-namespace or in
// any namespace; the install's namespace is the DaemonSet's. Each agent renews
// a Lease (v1alpha1.AgentLeaseName, "tandem-agent-<node>") there, annotated
// with its control API URL (v1alpha1.AnnControlEndpoint); the bearer token is
// the Secret the DaemonSet mounts as the agent's --token-file (see install.go).

// bytesPerCall is what an automatic --region-batch aims to read per agent
// call: 4096 regions of 64 KiB.
const bytesPerCall = 256 << 20

// maxTextRuns caps the runs listed in the text report (-o json lists all).
const maxTextRuns = 100

type verifyOptions struct {
	out           *outputFlags
	operatorNS    string
	agentSelector string
	tokenFile     string
	batch         int
	recheckDelay  time.Duration
	agentTimeout  time.Duration
	repair        bool
	tlsDir        string
}

func newVerifyCmd(o *rootOptions) *cobra.Command {
	vo := &verifyOptions{}
	cmd := &cobra.Command{
		Use:   "verify NAME",
		Short: "Compare the replicas of a VolumePair region by region (online verify)",
		Long: `Compare the replicas of a VolumePair (every member's, additional backups
included) region by region while it runs, like DRBD's online verify: each
member's agent hashes its local copy of every region (SHA-256) and the
plugin reports the regions whose sums differ on some member, as runs with
byte offsets.

The plugin finds the install from its agents' DaemonSet (labels
--agent-selector, in --operator-namespace or else in any namespace): the
agents are found through their Leases tandem-agent-<node> in its namespace
(annotation storage.tandem.dev/control-endpoint) and authenticated with the
token of the Secret the DaemonSet mounts as the agents' --token-file, or with
the plugin's --token-file.

Agents that serve mutual TLS (an https:// endpoint on their Lease; the
manager's --agent-tls=issue) are called with a client certificate: by
default the plugin reads the agents' CA from its Secret in the install's
namespace (tandem-agent-ca, or the manager Deployment's --agent-ca-name;
this needs get on that Secret) and signs itself a manager certificate
(spiffe://tandem.dev/manager) valid for 15 minutes, in memory. Without the
right to read that Secret, pass --tls-dir DIR holding a certificate of the
install's CA (tls.crt, tls.key) and the CA (ca.crt); --repair needs the
manager's identity.

While the pair is live a region being written can differ for a moment (the
write reaches the primary before the backup), and regions in a member's dirty
bitmap differ by design (writes not yet replicated, a resync in progress, the
diff of a SWAP). So a region that differs is hashed again on every member
after --recheck-delay, and it is reported only if it still differs and is in
no member's dirty bitmap, read both before and after the re-check.
Regions excluded that way are counted in the report.

Exit status: 0 when the replicas match, 1 when regions differ, 2 when the
check could not be completed.`,
		Example: `  kubectl tandem verify db -n prod
  kubectl tandem verify db --region-batch 512 -o json`,
		Args: func(cmd *cobra.Command, args []string) error {
			if err := nameArg(cmd, args); err != nil {
				return &exitError{code: 2, err: err}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			var p printers.ResourcePrinter
			if !vo.out.human() {
				var err error
				if p, err = vo.out.printer(); err != nil {
					return &exitError{code: 2, err: err}
				}
			}
			rep, err := runVerify(cmd.Context(), o, vo, args[0])
			if rep == nil {
				return &exitError{code: 2, err: err}
			}
			// A repair that could not be requested still has a report:
			// print it, then say why nothing was repaired.
			repairErr := err
			if !vo.out.human() {
				err = vo.out.printReport(p, o.streams.Out, rep)
			} else {
				err = renderVerify(o.streams.Out, rep)
			}
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			if repairErr != nil {
				return &exitError{code: 2, err: repairErr}
			}
			if rep.DifferingRegions > 0 {
				return &exitError{code: 1}
			}
			return nil
		},
	}
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &exitError{code: 2, err: err} })
	f := cmd.Flags()
	vo.out = addReportOutput(cmd, "the report")
	f.StringVar(&vo.operatorNS, "operator-namespace", "", "Namespace of the Tandem install (default: the namespace of the one DaemonSet matching --agent-selector).")
	f.StringVar(&vo.agentSelector, "agent-selector", defaultAgentSelector, "Label selector of the agents' DaemonSet.")
	f.StringVar(&vo.tokenFile, "token-file", "", "File holding the agents' bearer token (default: the Secret the agents' DaemonSet mounts as their token).")
	_ = cmd.RegisterFlagCompletionFunc("operator-namespace", o.completeNamespaces)
	f.IntVar(&vo.batch, "region-batch", 0, fmt.Sprintf("Regions hashed per agent call, 1 to %d (0: about %s per call).", agentapi.MaxChecksumRegions, humanBytes(bytesPerCall)))
	f.DurationVar(&vo.recheckDelay, "recheck-delay", 2*time.Second, "Wait before hashing differing regions again.")
	f.DurationVar(&vo.agentTimeout, "agent-timeout", 2*time.Minute, "Time limit of one agent call.")
	f.StringVar(&vo.tlsDir, "tls-dir", "", "Directory holding the client certificate (tls.crt, tls.key) and the agents' CA (ca.crt) to call agents that serve mutual TLS (default: sign a manager certificate with the CA of the install's Secret tandem-agent-ca, or the manager's --agent-ca-name).")
	_ = cmd.MarkFlagDirname("tls-dir")
	f.BoolVar(&vo.repair, "repair", false, "Ask the writer to copy the differing regions to its peer again (the writer's data wins).")
	return cmd
}

// verifyReport is the result of a verify run (-o json|yaml prints it).
type verifyReport struct {
	Volume     string   `json:"volume"`
	Nodes      []string `json:"nodes"`
	SizeBytes  int64    `json:"sizeBytes"`
	RegionSize int64    `json:"regionSize"`
	Regions    uint32   `json:"regions"`
	Algorithm  string   `json:"algorithm"`
	Seconds    float64  `json:"seconds"`
	// DifferingRegions still differed on the re-check and are in neither
	// member's dirty bitmap.
	DifferingRegions int         `json:"differingRegions"`
	DifferingBytes   int64       `json:"differingBytes"`
	Runs             []regionRun `json:"runs"`
	// SettledRegions differed on the first pass and matched on the re-check
	// (they were being written).
	SettledRegions int `json:"settledRegions"`
	// DirtyRegions still differed but are in a dirty bitmap: data not yet
	// replicated, which is expected; they are not reported as differing.
	DirtyRegions int      `json:"dirtyRegions"`
	Notes        []string `json:"notes,omitempty"`
}

// nodesOf lists the replicas' nodes.
func nodesOf(reps []*replica) []string {
	out := make([]string, len(reps))
	for i, r := range reps {
		out[i] = r.node
	}
	return out
}

// replica is one member's agent.
type replica struct {
	node string
	c    *agentapi.Client
	st   agentapi.Status
}

func runVerify(ctx context.Context, o *rootOptions, vo *verifyOptions, name string) (*verifyReport, error) {
	if vo.batch < 0 || vo.batch > agentapi.MaxChecksumRegions {
		return nil, fmt.Errorf("--region-batch %d: want 0 (automatic) or 1 to %d", vo.batch, agentapi.MaxChecksumRegions)
	}
	if vo.agentTimeout <= 0 {
		return nil, fmt.Errorf("--agent-timeout %s: want a positive duration", vo.agentTimeout)
	}
	c, vp, err := o.pair(ctx, name)
	if err != nil {
		return nil, err
	}
	ns := vp.Namespace
	operatorNS, token, err := vo.locate(ctx, c)
	if err != nil {
		return nil, err
	}
	var reps []*replica
	// Every member's agent is looked up before any is called: what the
	// API server says (a node that does not exist, an agent that is not
	// running) is quicker to hear than a timeout, and more to the point.
	// Every member's problem is reported, not only the first's.
	eps := map[string]string{}
	var errs []error
	for _, node := range vp.Spec.MemberNodes() {
		if eps[node], err = agentEndpoint(ctx, c, operatorNS, vp, node, time.Now()); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	httpc := agentHTTPClient(vo.agentTimeout)
	for _, ep := range eps {
		if strings.HasPrefix(ep, "https://") {
			cfg, err := vo.agentTLS(ctx, c, operatorNS)
			if err != nil {
				return nil, err
			}
			tr := httpc.Transport.(*http.Transport)
			tr.TLSClientConfig = cfg
			// The agents serve HTTP/1.1 over TLS (agentapi.TLSTransport).
			tr.ForceAttemptHTTP2 = false
			break
		}
	}
	for _, node := range vp.Spec.MemberNodes() {
		ep := eps[node]
		var err error
		r := &replica{node: node, c: &agentapi.Client{BaseURL: ep, Token: token, HTTP: httpc}}
		r.st, err = r.c.Get(ctx, ns, name)
		if err != nil {
			var ae *agentapi.APIError
			switch {
			case agentapi.IsNotFound(err):
				return nil, fmt.Errorf("node %s (agent %s) holds no replica of %s/%s", node, ep, ns, name)
			case strings.HasPrefix(ep, "https://") && isTLSError(err):
				return nil, fmt.Errorf("the TLS handshake with the agent of node %s (%s) failed: the agents' certificates and the client certificate must both be of the install's CA "+
					"(the Secret tandem-agent-ca, or the manager's --agent-ca-name; with --tls-dir, its ca.crt, tls.crt and tls.key): %w", node, ep, err)
			case errors.Is(err, agentapi.ErrNotSent):
				return nil, fmt.Errorf("cannot reach the agent of node %s at %s (from its Lease %s/%s): the plugin calls each member's agent directly, on its node's IP; "+
					"run it where the nodes' addresses are reachable (on a node, say), and check the agent: kubectl -n %s get pods -l %s -o wide --field-selector spec.nodeName=%s: %w",
					node, ep, operatorNS, storagev1alpha1.AgentLeaseName(node), operatorNS, defaultAgentSelector, node, err)
			case errors.As(err, &ae) && ae.Code == http.StatusUnauthorized:
				return nil, fmt.Errorf("the agent of node %s (%s) refused the token (HTTP 401): the token given (--token-file, or the Secret the agents' DaemonSet mounts) is not the one the agents were started with; "+
					"the agents read it when they start: restart them after changing the Secret: %w", node, ep, err)
			}
			return nil, fmt.Errorf("status of %s/%s on node %s (agent %s): %w", ns, name, node, ep, err)
		}
		if r.st.RegionSize == vp.Spec.RegionSizeBytes() && r.st.Size < vp.Spec.SizeBytes() {
			return nil, fmt.Errorf("the replica of %s/%s on node %s serves %s, spec.size asks for %s: the pair is growing (kubectl tandem status %s shows the Expanding condition); "+
				"verify once every member serves spec.size", ns, name, node, humanBytes(r.st.Size), humanBytes(vp.Spec.SizeBytes()), name)
		}
		if r.st.Size != vp.Spec.SizeBytes() || r.st.RegionSize != vp.Spec.RegionSizeBytes() {
			return nil, fmt.Errorf("the replica of %s/%s on node %s has size %d and region size %d, but the VolumePair declares %d and %d",
				ns, name, node, r.st.Size, r.st.RegionSize, vp.Spec.SizeBytes(), vp.Spec.RegionSizeBytes())
		}
		reps = append(reps, r)
	}

	rs := vp.Spec.RegionSizeBytes()
	regions := uint32(vp.Spec.SizeBytes() / rs)
	batch := uint32(vo.batch)
	if batch == 0 {
		batch = autoBatch(rs)
	}
	rep := &verifyReport{
		Volume: ns + "/" + name, Nodes: nodesOf(reps),
		SizeBytes: vp.Spec.SizeBytes(), RegionSize: rs, Regions: regions, Algorithm: agentapi.ChecksumAlgorithm,
		Runs: []regionRun{}, Notes: verifyNotes(vp, reps),
	}
	start := time.Now()
	progress := newProgress(o.streams.ErrOut, vo.out.human(), int64(regions)*rs)

	// First pass over the whole volume.
	var differ []uint32
	for first := uint32(0); first < regions; first += min(batch, regions-first) {
		n := min(batch, regions-first)
		d, err := compareWindow(ctx, reps, ns, name, first, n)
		if err != nil {
			return nil, err
		}
		differ = append(differ, d...)
		progress.add(int64(n) * rs)
	}
	progress.finish()

	// Re-check what differed, and set aside what a dirty bitmap explains.
	if len(differ) > 0 {
		select {
		case <-time.After(vo.recheckDelay):
		case <-ctx.Done():
			return nil, fmt.Errorf("verify %s/%s: %w", ns, name, ctx.Err())
		}
		dirtyBefore, err := dirtyRuns(ctx, reps, ns, name)
		if err != nil {
			return nil, err
		}
		var still []uint32
		for _, w := range recheckWindows(differ, batch) {
			d, err := compareWindow(ctx, reps, ns, name, w[0], w[1])
			if err != nil {
				return nil, err
			}
			still = append(still, intersectSorted(d, differ)...)
		}
		dirtyAfter, err := dirtyRuns(ctx, reps, ns, name)
		if err != nil {
			return nil, err
		}
		bad, dirty := splitDirty(still, append(dirtyBefore, dirtyAfter...)...)
		rep.SettledRegions = len(differ) - len(still)
		rep.DirtyRegions = len(dirty)
		rep.DifferingRegions = len(bad)
		rep.DifferingBytes = int64(len(bad)) * rs
		if len(bad) > 0 {
			rep.Runs = mergeRuns(bad, rs)
		}
	}
	rep.Seconds = time.Since(start).Seconds()
	if vo.repair && len(rep.Runs) > 0 {
		if err := repair(ctx, vp, reps, rep); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// repair asks the writer's agent to copy every differing run to its peer.
func repair(ctx context.Context, vp *storagev1alpha1.VolumePair, reps []*replica, rep *verifyReport) error {
	var writer *replica
	for _, r := range reps {
		if r.node == vp.Status.ActivePrimary && r.st.Role == agentapi.RolePrimary {
			writer = r
		}
	}
	if writer == nil {
		who := "no member is the writer (status.activePrimary is empty)"
		if vp.Status.ActivePrimary != "" {
			who = fmt.Sprintf("the writer %s (status.activePrimary) does not report itself primary on its agent", vp.Status.ActivePrimary)
		}
		return fmt.Errorf("--repair: nothing was repaired: %s, and only the writer's data may be copied over the others'; "+
			"run kubectl tandem verify --repair %s -n %s again once kubectl tandem status %s -n %s shows Ready True", who, vp.Name, vp.Namespace, vp.Name, vp.Namespace)
	}
	for _, run := range rep.Runs {
		if _, err := writer.c.Resync(ctx, vp.Namespace, vp.Name, run.FirstRegion, run.LastRegion-run.FirstRegion+1); err != nil {
			return fmt.Errorf("repair: resync of regions %d-%d on %s: %w", run.FirstRegion, run.LastRegion, writer.node, err)
		}
	}
	peers := "its peer"
	if len(reps) > 2 {
		peers = "every backup"
	}
	rep.Notes = append(rep.Notes, fmt.Sprintf("repair requested: %s copies %d regions to %s; run verify again once the pair is Synchronized", writer.node, rep.DifferingRegions, peers))
	return nil
}

// locate returns the install's namespace and the agents' token: the
// --operator-namespace and --token-file given, or what the agents' DaemonSet
// says.
func (vo *verifyOptions) locate(ctx context.Context, c client.Client) (ns, token string, err error) {
	if vo.tokenFile != "" {
		if token, err = readTokenFile(vo.tokenFile); err != nil {
			return "", "", err
		}
		if vo.operatorNS != "" {
			return vo.operatorNS, token, nil
		}
	}
	ds, err := findAgents(ctx, c, vo.agentSelector, vo.operatorNS)
	if err != nil {
		return "", "", err
	}
	if token != "" {
		return ds.Namespace, token, nil
	}
	ref, err := agentTokenRef(ds)
	if err != nil {
		return "", "", err
	}
	var s corev1.Secret
	if err := c.Get(ctx, client.ObjectKey{Namespace: ref.namespace, Name: ref.secret}, &s); err != nil {
		if apierrors.IsForbidden(err) {
			return "", "", fmt.Errorf("read the agents' token from %s, which DaemonSet %s/%s mounts: you may not read that Secret; "+
				"pass the token in a file with --token-file (ask whoever administers Tandem), or get permission to get secrets/%s in namespace %s: %w",
				ref, ds.Namespace, ds.Name, ref.secret, ref.namespace, err)
		}
		return "", "", fmt.Errorf("read the agents' token from %s, which DaemonSet %s/%s mounts (or pass --token-file): %w", ref, ds.Namespace, ds.Name, err)
	}
	// During a rotation the Secret lists several tokens, one per line:
	// the first is the one to present (package token).
	if l := agenttoken.Parse(s.Data[ref.key]); len(l) > 0 {
		token = l[0]
	}
	if token == "" {
		return "", "", fmt.Errorf("the agents' token: %s is missing or empty", ref)
	}
	return ds.Namespace, token, nil
}

func readTokenFile(name string) (string, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return "", fmt.Errorf("read --token-file: %w", err)
	}
	tok := ""
	if l := agenttoken.Parse(b); len(l) > 0 {
		tok = l[0]
	}
	if tok == "" {
		return "", fmt.Errorf("--token-file %s is empty", name)
	}
	return tok, nil
}

// isTLSError tells a failed TLS handshake or certificate check (which
// crypto/tls and crypto/x509 report with these prefixes, also for an alert
// the agent sent) from a network error.
func isTLSError(err error) bool {
	m := err.Error()
	return strings.Contains(m, "tls: ") || strings.Contains(m, "x509: ")
}

// connectTimeout bounds the TCP connection to an agent: an address that
// does not answer (a node down, a firewall that drops) fails in seconds,
// not after --agent-timeout.
var connectTimeout = 10 * time.Second

// agentHTTPClient is the HTTP client of the calls to the agents.
func agentHTTPClient(timeout time.Duration) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.DialContext = (&net.Dialer{Timeout: connectTimeout, KeepAlive: 30 * time.Second}).DialContext
	return &http.Client{Timeout: timeout, Transport: tr}
}

// memberField names the spec field that makes node a member of vp.
func memberField(vp *storagev1alpha1.VolumePair, node string) string {
	switch node {
	case vp.Spec.Primary.Node:
		return "spec.primary.node"
	case vp.Spec.Backup.Node:
		return "spec.backup.node"
	}
	for i, b := range vp.Spec.AdditionalBackups {
		if b.Node == node {
			return fmt.Sprintf("spec.additionalBackups[%d].node", i)
		}
	}
	return "a member"
}

// agentEndpoint reads the control API URL of node's agent from its Lease,
// explaining a node that does not exist, an agent that never registered
// and one that stopped renewing its Lease.
func agentEndpoint(ctx context.Context, c client.Client, operatorNS string, vp *storagev1alpha1.VolumePair, node string, now time.Time) (string, error) {
	var l coordinationv1.Lease
	name := storagev1alpha1.AgentLeaseName(node)
	if err := c.Get(ctx, client.ObjectKey{Namespace: operatorNS, Name: name}, &l); err != nil {
		field := memberField(vp, node)
		switch {
		case apierrors.IsNotFound(err):
			var n corev1.Node
			if apierrors.IsNotFound(c.Get(ctx, client.ObjectKey{Name: node}, &n)) {
				return "", fmt.Errorf("node %s (%s of volumepair %s/%s) does not exist in the cluster (kubectl get nodes lists them): a typo in the VolumePair, or a node that was removed; no agent holds a replica there: %w",
					node, field, vp.Namespace, vp.Name, err)
			}
			return "", fmt.Errorf("no Tandem agent has registered on node %s (%s of volumepair %s/%s): there is no Lease %s/%s; is the agent running there (kubectl -n %s get pods -l %s -o wide --field-selector spec.nodeName=%s)? "+
				"If Tandem is installed in another namespace, pass --operator-namespace: %w",
				node, field, vp.Namespace, vp.Name, operatorNS, name, operatorNS, defaultAgentSelector, node, err)
		case apierrors.IsForbidden(err):
			return "", fmt.Errorf("find the agent of node %s: you may not read the agents' Leases in namespace %s (verify needs get on leases.coordination.k8s.io there): %w", node, operatorNS, err)
		}
		return "", fmt.Errorf("find the agent of node %s: lease %s/%s: %w", node, operatorNS, name, err)
	}
	if r, d := l.Spec.RenewTime, l.Spec.LeaseDurationSeconds; r != nil && d != nil && now.Sub(r.Time) > time.Duration(*d)*time.Second {
		return "", fmt.Errorf("the agent of node %s is not running, or cannot reach the API server: it last renewed its Lease %s/%s %s ago (at %s; it renews it every few seconds). "+
			"Check it: kubectl -n %s get pods -l %s -o wide --field-selector spec.nodeName=%s",
			node, operatorNS, name, humanDuration(now.Sub(r.Time)), r.UTC().Format(time.RFC3339), operatorNS, defaultAgentSelector, node)
	}
	ep := strings.TrimRight(l.Annotations[storagev1alpha1.AnnControlEndpoint], "/")
	if ep == "" {
		return "", fmt.Errorf("find the agent of node %s: lease %s/%s has no %s annotation", node, operatorNS, name, storagev1alpha1.AnnControlEndpoint)
	}
	u, err := url.Parse(ep)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("find the agent of node %s: lease %s/%s: annotation %s=%q is not an http(s) URL", node, operatorNS, name, storagev1alpha1.AnnControlEndpoint, ep)
	}
	return ep, nil
}
