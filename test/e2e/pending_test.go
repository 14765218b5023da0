//go:build e2e

package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// pendingWith: the pair has not started, and Ready's reason is reason.
func pendingWith(reason string) func(*v1.VolumePair) bool {
	return func(vp *v1.VolumePair) bool {
		for _, c := range vp.Status.Conditions {
			if c.Type == v1.ConditionReady {
				return vp.Status.Phase == v1.PhasePending && c.Status == "False" && c.Reason == reason
			}
		}
		return false
	}
}

// authorityLeases lists the authority Leases of the story's pairs.
func (s *story) authorityLeases() string {
	s.t.Helper()
	out := mustKubectl(s.t, "-n", "tandem-system", "get", "lease", "-l", "storage.tandem.dev/component=authority",
		"-o", "jsonpath={range .items[*]}{.metadata.annotations.storage\\.tandem\\.dev/volumepair}{\"\\n\"}{end}")
	var ours []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, s.ns+"/") {
			ours = append(ours, l)
		}
	}
	return strings.Join(ours, " ")
}

// Story 19 (issue #19): a pair naming a node that does not exist, and one
// naming a node whose agent has not registered, never get a writer: no
// authority Lease, no Failover event; kubectl get, describe and kubectl
// tandem status say why, naming the field and the node. The second starts
// by itself once the agent registers; the first once its node name is
// corrected, leaving nothing of the misspelt node behind.
func TestStory19PairWaitsForItsNodes(t *testing.T) {
	s := newStory(t, "typo")
	s.apply(s.pairManifest("Async", "node-z", "node-b", "64Mi", ""))
	s.wait(60*time.Second, "typo PENDING/MemberNotFound", pendingWith("MemberNotFound"))

	get := mustKubectl(t, "get", "vp", "typo", "-n", s.ns)
	t.Logf("STORY 19 kubectl get vp typo:\n%s", get)
	desc := mustKubectl(t, "describe", "vp", "typo", "-n", s.ns)
	plugin, err := exec.Command(filepath.Join(bin, "kubectl-tandem"), "--kubeconfig", kubeconfig, "-n", s.ns, "status", "typo").CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl tandem status: %v\n%s", err, plugin)
	}
	for what, out := range map[string]string{"kubectl get vp": get, "kubectl describe vp": desc, "kubectl tandem status": string(plugin)} {
		for _, want := range []string{"PENDING", "MemberNotFound"} {
			if !strings.Contains(out, want) {
				t.Errorf("%s does not show %s:\n%s", what, want, out)
			}
		}
		if what != "kubectl get vp" && !strings.Contains(out, `spec.primary.node: node "node-z" does not exist`) {
			t.Errorf("%s does not name the field and the node:\n%s", what, out)
		}
	}
	s.wantEvent("MemberNotFound", `spec.primary.node: node "node-z" does not exist`)

	// The second pair: node-c exists but its agent has not registered (it
	// is stopped and its Lease gone, as on a node the DaemonSet does not
	// run on).
	late := &story{t: t, ns: s.ns, name: "late", touched: s.touched}
	s.lc("kill-agent", "node-c")
	t.Cleanup(func() { _, _ = lcRun("start-agent", "node-c") })
	mustKubectl(t, "-n", "tandem-system", "delete", "lease", "tandem-agent-node-c")
	late.apply(late.pairManifest("Sync", "node-a", "node-c", "64Mi", ""))
	late.wait(60*time.Second, "late PENDING/AgentNotRegistered", pendingWith("AgentNotRegistered"))

	// Neither gets a writer in more than the time a failover of a lost
	// writer takes (3 probes of 2 s, a 6 s authority Lease).
	for deadline := time.Now().Add(12 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		if l := s.authorityLeases(); l != "" {
			t.Fatalf("authority Leases for pending pairs: %s", l)
		}
		if !pendingWith("MemberNotFound")(s.get()) || !pendingWith("AgentNotRegistered")(late.get()) {
			t.Fatalf("a pair left PENDING: %+v / %+v", s.get().Status, late.get().Status)
		}
	}

	s.lc("start-agent", "node-c")
	vp := late.wait(90*time.Second, "late PAIR once node-c's agent registered", inSync("node-a"))
	if vp.Status.Epoch != 1 || vp.Status.LastFailoverTime != nil {
		t.Fatalf("late did not start cleanly: %+v", vp.Status)
	}

	mustKubectl(t, "patch", "vp", "typo", "-n", s.ns, "--type=merge", "-p", `{"spec":{"primary":{"node":"node-a"}}}`)
	vp = s.wait(90*time.Second, "typo PAIR once corrected", inSync("node-a"))
	if vp.Status.Epoch != 1 || vp.Status.LastFailoverTime != nil || len(vp.Status.RemovedMembers) != 0 || vp.Status.MemberStatus("node-z") != nil {
		t.Fatalf("typo did not start cleanly: %+v", vp.Status)
	}
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x19 0 1M", "read -P 0x19 0 1M")

	ev := mustKubectl(t, "get", "events", "-n", s.ns, "-o", "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}")
	for _, bad := range []string{"Failover", "MemberReplaced", "RemovedMemberPending", "StepFailed"} {
		for _, r := range strings.Fields(ev) {
			if r == bad {
				t.Errorf("event %s recorded:\n%s", bad, ev)
			}
		}
	}
}
