//go:build e2e

// Package e2e runs Tandem's user stories on the local multi-node cluster
// (hack/local-cluster.sh) through the doors a user uses: bin/kubectl, the
// nbd:// endpoint in status with real NBD clients, kubectl tandem, and node
// loss or partition. Run with `make test-e2e` (as root for network
// namespaces). Logs of every component are in .local/logs and printed for a
// failing story.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

var (
	root       string
	kubeconfig string
	bin        string
	agentToken string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) (code int) {
	_, file, _, _ := runtime.Caller(0)
	root = filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
	bin = filepath.Join(root, "bin")
	kubeconfig = filepath.Join(root, ".local", "kubeconfig")
	if os.Getenv("TANDEM_E2E_REUSE") == "" {
		if out, err := lcRun("up"); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: local-cluster up: %v\n%s\n", err, out)
			_, _ = lcRun("down")
			return 1
		}
		if os.Getenv("KEEP") == "" {
			// A cluster that does not come down leaves the host changed
			// (namespaces, mounts, processes): that fails the run.
			defer func() {
				if out, err := lcRun("down"); err != nil {
					fmt.Fprintf(os.Stderr, "e2e: local-cluster down failed, the host is not clean: %v\n%s\n", err, out)
					code = 1
				}
			}()
		}
	}
	b, err := os.ReadFile(filepath.Join(root, ".local", "agent-token"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: agent token: %v\n", err)
		return 1
	}
	agentToken = strings.TrimSpace(string(b))
	build := exec.Command("go", "build", "-o", filepath.Join(bin, "kubectl-tandem"), "./cmd/kubectl-tandem")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: build kubectl-tandem: %v\n%s\n", err, out)
		return 1
	}
	return m.Run()
}

func lcRun(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(root, "hack", "local-cluster.sh"), args...)
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// lc runs a local-cluster.sh verb.
func lc(t *testing.T, args ...string) string {
	t.Helper()
	out, err := lcRun(args...)
	if err != nil {
		t.Fatalf("local-cluster.sh %v: %v\n%s", args, err, out)
	}
	return out
}

func kubectl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), kubectlBound(args))
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "kubectl"), append([]string{"--kubeconfig", kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// kubectlBound is how long a kubectl run may take: a minute, or longer
// than the --timeout it was given (rollout status, wait), so that kubectl
// reports its own timeout instead of being killed before it.
func kubectlBound(args []string) time.Duration {
	bound := 60 * time.Second
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--timeout="); ok {
			if d, err := time.ParseDuration(v); err == nil && d+30*time.Second > bound {
				bound = d + 30*time.Second
			}
		}
	}
	return bound
}

// mustKubectl runs kubectl and fails the test if it fails. An answer that
// says the API server was busy (a timeout, etcd slow) is tried again for up
// to transientFor: on a loaded two-core machine that happens now and then
// and says nothing about Tandem.
func mustKubectl(t *testing.T, args ...string) string {
	t.Helper()
	deadline := time.Now().Add(transientFor)
	for {
		out, err := kubectl(t, args...)
		if err == nil {
			return out
		}
		if !transientAPIError(out) || time.Now().After(deadline) {
			t.Fatalf("kubectl %v: %v\n%s", args, err, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// transientAPIError says whether kubectl's output reports an API server
// that could not answer in time, rather than an answer.
func transientAPIError(out string) bool {
	for _, s := range []string{"Timeout: request did not complete", "the server was unable to return a response in the time allotted",
		"etcdserver: request timed out", "http: Handler timeout", "context deadline exceeded", "TLS handshake timeout",
		"the server is currently unable to handle the request", "connection reset by peer"} {
		if strings.Contains(out, s) {
			return true
		}
	}
	return false
}

// story gives one user story its namespace and dumps logs when it fails.
type story struct {
	t       *testing.T
	ns      string
	name    string
	touched map[string]bool
}

func newStory(t *testing.T, name string) *story {
	s := &story{t: t, ns: "e2e-" + strings.ToLower(strings.ReplaceAll(t.Name(), "_", "-")), name: name, touched: map[string]bool{}}
	if len(s.ns) > 60 {
		s.ns = s.ns[:60]
	}
	s.ns = strings.Trim(strings.ReplaceAll(s.ns, "/", "-"), "-")
	mustKubectl(t, "create", "namespace", s.ns)
	t.Cleanup(func() {
		if t.Failed() {
			s.dumpLogs()
		}
		// Every node and the manager come back for the next story.
		for n := range s.touched {
			_, _ = lcRun("heal", n)
			_, _ = lcRun("restore-node", n)
		}
		_, _ = lcRun("start-manager")
		// The VolumePairs go first (the controller removes the replicas);
		// the local cluster has no namespace controller, so the namespace
		// itself stays Terminating: do not wait for it.
		_, _ = kubectl(t, "delete", "vp", "--all", "-n", s.ns, "--wait=true", "--timeout=60s")
		_, _ = kubectl(t, "delete", "namespace", s.ns, "--wait=false")
	})
	return s
}

// lc runs a local-cluster.sh verb for this story and remembers the nodes it
// disturbed, so the cleanup restores exactly those.
func (s *story) lc(args ...string) string {
	s.t.Helper()
	if len(args) > 1 {
		s.touched[args[1]] = true
	}
	return lc(s.t, args...)
}

func (s *story) dumpLogs() {
	t := s.t
	out, _ := kubectl(t, "get", "vp", "-n", s.ns, "-o", "yaml")
	t.Logf("---- VolumePairs in %s ----\n%s", s.ns, out)
	ev, _ := kubectl(t, "get", "events", "-n", s.ns, "--sort-by=.lastTimestamp")
	t.Logf("---- events ----\n%s", ev)
	logs, _ := filepath.Glob(filepath.Join(root, ".local", "logs", "*.log"))
	// With real nodes, the containers' logs: nodes/NODE/pods/NS_POD_UID/CONTAINER/N.log.
	pods, _ := filepath.Glob(filepath.Join(root, ".local", "logs", "nodes", "*", "pods", "*", "*", "*.log"))
	logs = append(logs, pods...)
	for _, f := range logs {
		b, _ := os.ReadFile(f)
		lines := strings.Split(string(b), "\n")
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		name, _ := filepath.Rel(filepath.Join(root, ".local", "logs"), f)
		t.Logf("---- %s (tail) ----\n%s", name, strings.Join(lines, "\n"))
	}
}

func (s *story) apply(manifest string) {
	s.t.Helper()
	cmd := exec.Command(filepath.Join(bin, "kubectl"), "--kubeconfig", kubeconfig, "apply", "-n", s.ns, "-f", "-")
	cmd.Stdin = strings.NewReader(manifest)
	if out, err := cmd.CombinedOutput(); err != nil {
		s.t.Fatalf("kubectl apply: %v\n%s", err, out)
	}
}

// pairManifest is a VolumePair for this story.
func (s *story) pairManifest(mode, primary, backup, size string, extra string) string {
	return fmt.Sprintf(`apiVersion: storage.tandem.dev/v1alpha1
kind: VolumePair
metadata:
  name: %s
spec:
  size: %s
  mode: %s
  primary: {node: %s}
  backup: {node: %s}
%s`, s.name, size, mode, primary, backup, extra)
}

// get reads the VolumePair. A failed read is tried again for up to
// transientFor: on a busy two-core machine the API server now and then
// times a request out, which says nothing about Tandem.
func (s *story) get() *v1.VolumePair {
	s.t.Helper()
	var last error
	for deadline := time.Now().Add(transientFor); ; {
		out, err := kubectl(s.t, "get", "vp", s.name, "-n", s.ns, "-o", "json")
		if err == nil {
			vp := &v1.VolumePair{}
			if err := json.Unmarshal([]byte(out), vp); err != nil {
				s.t.Fatalf("decode VolumePair: %v", err)
			}
			return vp
		}
		last = fmt.Errorf("%w: %s", err, strings.TrimSpace(out))
		if time.Now().After(deadline) {
			s.t.Fatalf("kubectl get vp %s -n %s failed for %s: %v", s.name, s.ns, transientFor, last)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// transientFor is how long a story keeps trying a read that failed (the
// API server or an agent busy, not down) before it fails.
const transientFor = 15 * time.Second

// wait polls the VolumePair (kubectl, every 250 ms) until cond holds, and
// returns it.
func (s *story) wait(d time.Duration, what string, cond func(*v1.VolumePair) bool) *v1.VolumePair {
	s.t.Helper()
	var vp *v1.VolumePair
	testkit.Eventually(s.t, d, what, func() (bool, string) {
		vp = s.get()
		return cond(vp), fmt.Sprintf("status: %+v", vp.Status)
	}, testkit.Every(250*time.Millisecond))
	return vp
}

// wantEvent waits until an event with this reason on the story's namespace
// carries the message.
func (s *story) wantEvent(reason, message string) {
	s.t.Helper()
	testkit.Eventually(s.t, 30*time.Second, "event "+reason+": "+message, func() (bool, string) {
		out, err := kubectl(s.t, "get", "events", "-n", s.ns, "--field-selector", "reason="+reason, "-o", "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}")
		return err == nil && strings.Contains(out, message), out
	}, testkit.Every(250*time.Millisecond))
}

func condTrue(vp *v1.VolumePair, typ string) bool {
	for _, c := range vp.Status.Conditions {
		if c.Type == typ {
			return c.Status == "True"
		}
	}
	return false
}

// inSync: the writer is active, both members are up to date and connected.
func inSync(active string) func(*v1.VolumePair) bool {
	return func(vp *v1.VolumePair) bool {
		return vp.Status.ActivePrimary == active && vp.Status.Endpoint != "" && condTrue(vp, v1.ConditionReady) &&
			condTrue(vp, v1.ConditionSynchronized) && vp.Status.OutOfSyncBytes == 0 && vp.Status.ObservedGeneration == vp.Generation
	}
}

// qemuIO runs qemu-io commands on an nbd:// URI and returns its output.
func qemuIO(uri string, cmds ...string) (string, error) {
	return qemuIOWithin(30*time.Second, uri, cmds...)
}

// qemuIOWithin bounds the run: a client of a node whose link is cut would
// otherwise wait for TCP's connect retries.
func qemuIOWithin(d time.Duration, uri string, cmds ...string) (string, error) {
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, uri)
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-io", args...).CombinedOutput()
	if err == nil && (bytes.Contains(out, []byte("failed")) || bytes.Contains(out, []byte("error"))) {
		err = fmt.Errorf("qemu-io reported a failure")
	}
	return string(out), err
}

func mustQemuIO(t *testing.T, uri string, cmds ...string) string {
	t.Helper()
	out, err := qemuIO(uri, cmds...)
	if err != nil {
		t.Fatalf("qemu-io %v on %s: %v\n%s", cmds, uri, err, out)
	}
	return out
}

// replicaFile is where a member's backing file is (or would be) on this
// host: hack/local-cluster.sh replica-path, which knows the node's data dir.
func replicaFile(node, ns, name string) string {
	out, _ := lcRun("replica-path", node, ns+"/"+name) // non-zero when the file does not exist
	p, _, _ := strings.Cut(out, "\n")
	return strings.TrimSpace(p)
}

func (s *story) replicaPath(node string) string {
	s.t.Helper()
	return strings.TrimSpace(lc(s.t, "replica-path", node, s.ns+"/"+s.name))
}

// identical waits for the pair to be in sync and compares both backing files.
func (s *story) identical(active, other string) {
	s.t.Helper()
	s.wait(90*time.Second, "in sync before comparing replicas", inSync(active))
	// The status lags a restart shorter than a probe period: wait for the
	// agents themselves to report the resync done.
	deadline := time.Now().Add(90 * time.Second)
	for {
		a, o := s.agentStatus(active), s.agentStatus(other)
		if a.Writable && a.PeerConnected && !a.Copy.Running && a.OutOfSyncBytes == 0 && o.DataState == agentapi.UpToDate {
			break
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("agents not in sync 90 s later: %s %+v, %s %+v", active, a, other, o)
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // the backup's durable ack trails by a few ms
	a, b := testkit.FileSHA256(s.t, s.replicaPath(active)), testkit.FileSHA256(s.t, s.replicaPath(other))
	if a != b {
		s.t.Fatalf("replicas differ: %s=%s %s=%s", active, a, other, b)
	}
}

// agentStatus reads a member's own view through its control API.
// A failed read is tried again for up to transientFor.
func (s *story) agentStatus(node string) agentapi.Status {
	s.t.Helper()
	var last error
	for deadline := time.Now().Add(transientFor); ; {
		c, err := agentClient(s.t, node)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			var st agentapi.Status
			st, err = c.Get(ctx, s.ns, s.name)
			cancel()
			if err == nil {
				return st
			}
		}
		last = err
		if time.Now().After(deadline) {
			s.t.Fatalf("agent status on %s: %v", node, last)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// writeUntilAccepted retries a write on the current endpoint until it is
// accepted; it returns when, measured from start. An attempt is bounded by a
// second: while the writer's node is gone its endpoint stays in status (it
// may still serve, as far as the controller knows), and a connection to it
// hangs until the bound, which the measurement would otherwise add to the
// failover (up to 2 s with a 2 s bound: story 2 measured 6.8 to 11 s for
// the same failover).
func (s *story) writeUntilAccepted(start time.Time, limit time.Duration, cmd string) time.Duration {
	s.t.Helper()
	for {
		vp := s.get()
		if vp.Status.Endpoint != "" {
			if _, err := qemuIOWithin(time.Second, vp.Status.Endpoint, cmd); err == nil {
				return time.Since(start)
			}
		}
		if time.Since(start) > limit {
			s.t.Fatalf("no write accepted within %v; status %+v", limit, vp.Status)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
