//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// Story 21 (issue #18): a volume grows from 1 GiB to 2 GiB while fio
// writes to it. The writes go on without an error, the pair reports the new
// size once both members serve it, a new client sees 2 GiB and writes past
// the old end, and both replicas are identical afterwards.
func TestStory21GrowUnderLoad(t *testing.T) {
	s := newStory(t, "grow")
	s.apply(s.pairManifest("Sync", "node-a", "node-b", "1Gi", ""))
	vp := s.wait(60*time.Second, "PAIR with an endpoint", inSync("node-a"))

	// fio writes for 40 s; the grow starts once it has been running a few
	// seconds, and the run is checked to have spanned the whole grow.
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	done := make(chan fioRun, 1)
	go func() { done <- runFio(ctx, vp.Status.Endpoint, 40*time.Second, 400) }()
	time.Sleep(5 * time.Second) // positions the grow inside the run; the run's span is checked below

	start := time.Now()
	mustKubectl(t, "patch", "vp", s.name, "-n", s.ns, "--type", "merge", "-p", `{"spec":{"size":"2Gi"}}`)
	// Grown: the writer serves 2Gi and no member has still to grow. (Not
	// "in sync" yet: under fio's Sync writes the status may count writes
	// in flight as out of sync; the replicas are compared after the run.)
	vp = s.wait(60*time.Second, "both members serving 2Gi", func(vp *v1.VolumePair) bool {
		for _, c := range vp.Status.Conditions {
			if c.Type == v1.ConditionExpanding {
				return grownTo(vp, 2<<30) && c.Status == "False" && c.ObservedGeneration == vp.Generation
			}
		}
		return false
	})
	grown := time.Since(start)
	s.wantEvent("VolumeExpanded", "2Gi")

	r := <-done
	if r.failure != "" {
		t.Fatalf("fio during the grow: %s", r.failure)
	}
	if !r.start.Before(start) || !r.end.After(start.Add(grown)) {
		t.Fatalf("fio ran %s–%s, the grow %s–%s: the run did not span the grow", r.start.Format(time.StampMilli), r.end.Format(time.StampMilli),
			start.Format(time.StampMilli), start.Add(grown).Format(time.StampMilli))
	}

	// A new client sees the new size and writes past the old end.
	info, err := exec.Command("nbdinfo", "--size", vp.Status.Endpoint).CombinedOutput()
	if err != nil || strings.TrimSpace(string(info)) != fmt.Sprint(2<<30) {
		t.Fatalf("nbdinfo --size %s after the grow: %v %s", vp.Status.Endpoint, err, info)
	}
	mustQemuIO(t, vp.Status.Endpoint, "write -P 0x62 1536M 1M", "write -P 0x63 2047M 1M", "flush",
		"read -P 0x62 1536M 1M", "read -P 0x63 2047M 1M")
	s.identical("node-a", "node-b")
	t.Logf("STORY 21 grown from 1Gi to 2Gi in %s while fio wrote (%d I/Os, no error); a new client sees 2Gi; replicas identical",
		grown.Round(10*time.Millisecond), r.ios)
}

// Story 22 (issue #18): a PersistentVolumeClaim grows while its Pod writes.
// The claim's new size reaches the VolumePair, both members grow, the node
// plugin grows the attached device and the filesystem under the running
// Pod, which goes on acknowledging records without an error or a restart.
// The filesystem is XFS: this machine withholds CAP_SYS_RESOURCE, which
// ext4's online resize needs (docs/reliability.md, Open).
func TestStory22ClaimGrowsUnderItsPod(t *testing.T) {
	requireKubeletNodes(t)
	primary, backup := failoverNodes(t)
	s := newStory(t, "records")
	// XFS needs 300 MB at least.
	s.startRecorder(primary, backup, "  csi.storage.k8s.io/fstype: xfs\n", "512Mi")
	pod := s.waitRecorder(20)
	pvName := strings.TrimSpace(mustKubectl(t, "get", "pvc", "data-recorder-0", "-n", s.ns, "-o", "jsonpath={.spec.volumeName}"))
	handle := strings.TrimSpace(mustKubectl(t, "get", "pv", pvName, "-o", "jsonpath={.spec.csi.volumeHandle}"))
	pair := &story{t: t, ns: "tandem-system", name: handle}
	before := fsSize(t, pod.Spec.NodeName, pvName)

	start := time.Now()
	acked, _ := lastAck(recorderLog(t, pod.Spec.NodeName, s.ns, pod.Name, string(pod.UID)))
	mustKubectl(t, "patch", "pvc", "data-recorder-0", "-n", s.ns, "--type", "merge", "-p", `{"spec":{"resources":{"requests":{"storage":"1Gi"}}}}`)
	// The kubelet grows a mounted volume's filesystem at its next sync of
	// the Pod (about a minute; nothing triggers it sooner).
	testkit.Eventually(t, 240*time.Second, "the claim's capacity 1Gi, no resize pending", func() (bool, string) {
		out := mustKubectl(t, "get", "pvc", "data-recorder-0", "-n", s.ns, "-o", "jsonpath={.status.capacity.storage} {.status.conditions[*].type}")
		capacity, conds, _ := strings.Cut(strings.TrimSpace(out), " ")
		return capacity == "1Gi" && !strings.Contains(conds, "Resiz"), out
	}, testkit.Every(time.Second))
	took := time.Since(start)
	vp := pair.get()
	if !grownTo(vp, 1<<30) || vp.Spec.Size.Value() != 1<<30 {
		t.Fatalf("VolumePair %s: spec.size %s, status.size %v, want 1Gi", handle, vp.Spec.Size.String(), vp.Status.Size)
	}
	after := fsSize(t, pod.Spec.NodeName, pvName)
	if after <= before+400<<20 {
		t.Fatalf("the filesystem of %s is %d bytes after the claim grew (%d before): not grown", pvName, after, before)
	}
	testkit.Eventually(t, 30*time.Second, "records acknowledged after the grow", func() (bool, string) {
		n, _ := lastAck(recorderLog(t, pod.Spec.NodeName, s.ns, pod.Name, string(pod.UID)))
		return n >= acked+20, fmt.Sprintf("last ack %d", n)
	}, testkit.Every(250*time.Millisecond))
	p, _ := podOf(t, s.ns, "recorder-0")
	if p == nil || p.UID != pod.UID || len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].RestartCount != 0 {
		t.Fatalf("the Pod did not keep running through the grow: %+v", p)
	}
	for _, l := range recorderLog(t, pod.Spec.NodeName, s.ns, pod.Name, string(pod.UID)) {
		if l.verb == "error" || l.verb == "torn" {
			t.Fatalf("the recorder saw %s across the grow", l.verb)
		}
	}
	// The Pod stops (the volume is detached), then the replicas compare.
	mustKubectl(t, "scale", "statefulset", "recorder", "-n", s.ns, "--replicas=0")
	testkit.Eventually(t, 120*time.Second, "recorder-0 gone and the volume detached", func() (bool, string) {
		_, running := podOf(t, s.ns, "recorder-0")
		left := strings.TrimSpace(mustKubectl(t, "get", "volumeattachments", "-o",
			`jsonpath={range .items[?(@.spec.source.persistentVolumeName=="`+pvName+`")]}{.metadata.name}{end}`))
		return !running && left == "", fmt.Sprintf("pod %t, attachments %q", running, left)
	}, testkit.Every(time.Second))
	pair.identical(primary, backup)
	t.Logf("STORY 22 claim grown from 512Mi to 1Gi under its running Pod in %s: filesystem %d → %d bytes, records acknowledged throughout, replicas identical",
		took.Round(10*time.Millisecond), before, after)
}

// fsSize is the size in bytes of the filesystem of a PersistentVolume
// mounted on node (its Pod's mount, in the node's mount namespace).
func fsSize(t *testing.T, node, pv string) int64 {
	t.Helper()
	holder, err := os.ReadFile(filepath.Join(root, ".local", "pids", "holder-"+node+".pid"))
	if err != nil {
		t.Fatalf("node %s's mount namespace: %v", node, err)
	}
	out, err := exec.Command("nsenter", "-t", strings.TrimSpace(string(holder)), "-m", "findmnt", "-rnb", "-o", "SIZE,TARGET").CombinedOutput()
	if err != nil {
		t.Fatalf("findmnt on %s: %v %s", node, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		size, target, ok := strings.Cut(l, " ")
		if ok && strings.HasSuffix(target, "/volumes/kubernetes.io~csi/"+pv+"/mount") {
			n, err := strconv.ParseInt(size, 10, 64)
			if err != nil {
				t.Fatalf("findmnt size %q: %v", size, err)
			}
			return n
		}
	}
	t.Fatalf("no Pod mount of %s on %s:\n%s", pv, node, out)
	return 0
}

// grownTo: the writer serves size bytes (status.size).
func grownTo(vp *v1.VolumePair, size int64) bool {
	return vp.Status.Size != nil && vp.Status.Size.Value() == size
}
