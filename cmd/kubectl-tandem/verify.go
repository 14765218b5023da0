package main

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/cli-runtime/pkg/printers"
	"sigs.k8s.io/controller-runtime/pkg/client"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
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
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			if !vo.out.human() {
				err = vo.out.printReport(p, o.streams.Out, rep)
			} else {
				err = renderVerify(o.streams.Out, rep)
			}
			if err != nil {
				return &exitError{code: 2, err: err}
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
	ns, err := o.namespace()
	if err != nil {
		return nil, err
	}
	c, err := o.newClient()
	if err != nil {
		return nil, err
	}
	vp, err := getPair(ctx, c, ns, name)
	if err != nil {
		return nil, err
	}
	operatorNS, token, err := vo.locate(ctx, c)
	if err != nil {
		return nil, err
	}
	var reps []*replica
	for _, node := range vp.Spec.MemberNodes() {
		ep, err := agentEndpoint(ctx, c, operatorNS, node)
		if err != nil {
			return nil, err
		}
		r := &replica{node: node, c: &agentapi.Client{BaseURL: ep, Token: token, HTTP: &http.Client{Timeout: vo.agentTimeout}}}
		r.st, err = r.c.Get(ctx, ns, name)
		if err != nil {
			if agentapi.IsNotFound(err) {
				return nil, fmt.Errorf("node %s (agent %s) holds no replica of %s/%s", node, ep, ns, name)
			}
			return nil, fmt.Errorf("status of %s/%s on node %s (agent %s): %w", ns, name, node, ep, err)
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
			return nil, err
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
		return fmt.Errorf("repair: no writer found (status.activePrimary %q)", vp.Status.ActivePrimary)
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
		return "", "", fmt.Errorf("read the agents' token from %s, which DaemonSet %s/%s mounts (or pass --token-file): %w", ref, ds.Namespace, ds.Name, err)
	}
	token = strings.TrimSpace(string(s.Data[ref.key]))
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
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("--token-file %s is empty", name)
	}
	return tok, nil
}

// agentEndpoint reads the control API URL of node's agent from its Lease.
func agentEndpoint(ctx context.Context, c client.Client, operatorNS, node string) (string, error) {
	var l coordinationv1.Lease
	name := storagev1alpha1.AgentLeaseName(node)
	if err := c.Get(ctx, client.ObjectKey{Namespace: operatorNS, Name: name}, &l); err != nil {
		return "", fmt.Errorf("find the agent of node %s: lease %s/%s (is the agent running? see --operator-namespace): %w", node, operatorNS, name, err)
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
