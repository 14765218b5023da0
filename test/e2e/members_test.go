//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Story 17: a member's node is replaced without deleting the pair (a node
// retired for good). The backup node-b is replaced by node-c in the spec:
// node-c receives a full copy while the writer keeps serving, the pair is
// in sync on node-a and node-c, both replicas are byte-identical, every
// acknowledged write reads back, and node-b's replica is deleted once
// redundancy is back.
func TestStory17ReplaceMember(t *testing.T) {
	s := newStory(t, "swap-disk")
	const size = 64 << 20
	s.apply(s.pairManifest("Sync", "node-a", "node-b", "64Mi", ""))
	vp := s.wait(60*time.Second, "PAIR", inSync("node-a"))
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x51 0 8M", "write -P 0x52 40M 2M")
	s.wait(30*time.Second, "in sync", inSync("node-a"))
	oldDir := filepath.Dir(s.replicaPath("node-b"))
	if _, err := os.Stat(oldDir); err != nil {
		t.Fatalf("node-b's replica: %v", err)
	}
	before := s.agentStatus("node-a").Copy.CopiedBytesTotal

	mustKubectl(t, "patch", "vp", s.name, "-n", s.ns, "--type=merge", "-p", `{"spec":{"backup":{"node":"node-c"}}}`)
	replacedAt := time.Now()
	// Writes go on during the copy.
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x53 20M 1M")
	vp = s.wait(120*time.Second, "in sync with node-c", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus("node-c")
		return inSync("node-a")(vp) && ms != nil && ms.DataState == v1.DataUpToDate && ms.LastSeen != nil && ms.LastSeen.After(replacedAt)
	})
	copied := s.agentStatus("node-a").Copy.CopiedBytesTotal - before
	t.Logf("STORY 17 node-b replaced by node-c: full copy %d bytes of %d in %.1fs", copied, size, time.Since(replacedAt).Seconds())
	if copied < size {
		t.Fatalf("the copy to node-c was %d bytes, not the whole volume (%d)", copied, size)
	}
	s.identical("node-a", "node-c")
	mustQemuIO(t, vp.Status.Endpoint, "read -P 0x51 0 8M", "read -P 0x53 20M 1M", "read -P 0x52 40M 2M")
	s.wait(60*time.Second, "node-b's replica deleted", func(vp *v1.VolumePair) bool {
		_, err := os.Stat(oldDir)
		return len(vp.Status.RemovedMembers) == 0 && os.IsNotExist(err) && vp.Status.MemberStatus("node-b") == nil
	})
	ev := mustKubectl(t, "get", "events", "-n", s.ns)
	for _, want := range []string{"MemberReplaced", "MemberRemoved"} {
		if !strings.Contains(ev, want) {
			t.Errorf("no %s event:\n%s", want, ev)
		}
	}
	// kubectl shows the new member.
	out := mustKubectl(t, "get", "vp", s.name, "-n", s.ns, "-o", "jsonpath={.spec.backup.node} {.status.members[*].node}")
	if fmt.Sprint(strings.Fields(out)) != "[node-c node-a node-c]" && fmt.Sprint(strings.Fields(out)) != "[node-c node-c node-a]" {
		t.Fatalf("spec.backup and status.members: %q", out)
	}
}
