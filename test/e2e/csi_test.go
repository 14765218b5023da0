//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// recorderLine is one line of the recorder's container log (CRI format:
// time, stream, tag, text).
type recorderLine struct {
	at   time.Time
	verb string // ack, verified, torn, error, stopped
	n    int64
}

var recorderRe = regexp.MustCompile(`^(\S+) \S+ \S+ RECORDER (ack|verified|torn|error|stopped)\s*(\d*)`)

// recorderLog reads the recorder's log of one Pod (by UID) on a node, from
// the node's disk: the lines a Pod printed before its node was killed are
// there too.
func recorderLog(t *testing.T, node, ns, pod, uid string) []recorderLine {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(root, ".local", "logs", "nodes", node, "pods", ns+"_"+pod+"_"+uid, "recorder", "*.log"))
	var out []recorderLine
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			m := recorderRe.FindStringSubmatch(sc.Text())
			if m == nil {
				continue
			}
			at, _ := time.Parse(time.RFC3339Nano, m[1])
			n, _ := strconv.ParseInt(m[3], 10, 64)
			out = append(out, recorderLine{at: at, verb: m[2], n: n})
		}
		fh.Close()
	}
	return out
}

func lastAck(lines []recorderLine) (int64, time.Time) {
	n, at := int64(-1), time.Time{}
	for _, l := range lines {
		if l.verb == "ack" && l.n > n {
			n, at = l.n, l.at
		}
	}
	return n, at
}

// podOf reads the StatefulSet's Pod.
func podOf(t *testing.T, ns, name string) (*corev1.Pod, bool) {
	out, err := kubectl(t, "get", "pod", name, "-n", ns, "-o", "json")
	if err != nil {
		return nil, false
	}
	p := &corev1.Pod{}
	if err := json.Unmarshal([]byte(out), p); err != nil {
		t.Fatalf("decode Pod: %v", err)
	}
	return p, true
}

// Story 16: a StatefulSet's Pod writes durable numbered records to a
// filesystem on a PersistentVolumeClaim of a Tandem StorageClass. The node
// it runs on (the pair's writer) is killed; the Pod runs again on the
// promoted member, its filesystem mounts cleanly and every record it had
// acknowledged is there (Sync); the node comes back, resyncs, and the
// writer fails back to it while the Pod keeps writing from the other node.
func TestStory16PodFollowsWriter(t *testing.T) {
	requireKubeletNodes(t)
	primary, backup := failoverNodes(t)
	// The node plugin says which attach path it uses, and why: this
	// machine's kernel decides which one.
	want := "user-space"
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		want = "kernel NBD"
	}
	path := mustKubectl(t, "-n", "tandem-system", "get", "lease", "tandem-csi-node-"+primary, "-o", "jsonpath={.metadata.annotations.csi\\.tandem\\.dev/attach-path}")
	if !strings.HasPrefix(path, want) {
		t.Fatalf("the node plugin on %s reports the attach path %q, want %s", primary, path, want)
	}
	s := newStory(t, "records")
	s.startRecorder(primary, backup, "", "64Mi")

	// The Pod writes on the primary.
	pod := s.waitRecorder(40)
	if pod.Spec.NodeName != primary {
		t.Fatalf("recorder-0 runs on %s, want %s (its preferred node)", pod.Spec.NodeName, primary)
	}
	pvName := strings.TrimSpace(mustKubectl(t, "get", "pvc", "data-recorder-0", "-n", s.ns, "-o", "jsonpath={.spec.volumeName}"))
	handle := strings.TrimSpace(mustKubectl(t, "get", "pv", pvName, "-o", "jsonpath={.spec.csi.volumeHandle}"))
	pair := &story{t: t, ns: "tandem-system", name: handle}
	getVP := pair.get
	vp := getVP()
	if vp.Spec.Primary.Node != primary || vp.Spec.Backup.Node != backup || vp.Annotations["csi.tandem.dev/pvc"] != s.ns+"/data-recorder-0" {
		t.Fatalf("VolumePair %s: members %s/%s, annotations %v", handle, vp.Spec.Primary.Node, vp.Spec.Backup.Node, vp.Annotations)
	}
	if vp.Spec.Clients == nil || len(vp.Spec.Clients.Nodes) != 1 || vp.Spec.Clients.Nodes[0] != primary {
		t.Fatalf("VolumePair %s client nodes %+v, want the Pod's node %s", handle, vp.Spec.Clients, primary)
	}

	// The writer's node, where the Pod runs, is lost.
	s.lc("kill-node", primary)
	killed := time.Now()
	before, _ := lastAck(recorderLog(t, primary, s.ns, pod.Name, string(pod.UID)))

	var moved *corev1.Pod
	var verified int64 = -1
	var firstAck, verifiedAt time.Time
	testkit.Eventually(t, 120*time.Second, "recorder-0 writing again on "+backup, func() (bool, string) {
		p, ok := podOf(t, s.ns, "recorder-0")
		if !ok || p.UID == pod.UID || p.Spec.NodeName == "" {
			return false, "old Pod still there or none scheduled"
		}
		moved = p
		for _, l := range recorderLog(t, p.Spec.NodeName, s.ns, p.Name, string(p.UID)) {
			switch {
			case l.verb == "verified":
				verified = l.n
				verifiedAt = l.at
			case l.verb == "ack" && firstAck.IsZero():
				firstAck = l.at
			case l.verb == "error":
				t.Fatalf("the recorder failed on %s", p.Spec.NodeName)
			}
		}
		return !firstAck.IsZero(), fmt.Sprintf("new Pod on %s (%s), verified %d", p.Spec.NodeName, p.Status.Phase, verified)
	}, testkit.Every(250*time.Millisecond))
	took := firstAck.Sub(killed)
	if moved.Spec.NodeName != backup {
		t.Fatalf("recorder-0 came back on %s, want the promoted member %s", moved.Spec.NodeName, backup)
	}
	// Sync: every acknowledged record survived (the record being written at
	// the kill may be there too, or torn: it was never acknowledged).
	if verified < before+1 {
		t.Fatalf("after the failover %d records are intact, but %d were acknowledged", verified, before+1)
	}
	vp = getVP()
	if vp.Status.ActivePrimary != backup {
		t.Fatalf("the pair's writer is %s, want %s", vp.Status.ActivePrimary, backup)
	}
	t.Logf("STORY 16 pod failover: %s (writer, Pod) killed → recorder-0 writing again on %s in %.2fs; %d records acknowledged before, %d intact after",
		primary, backup, took.Seconds(), before+1, verified)
	t.Logf("STORY 16 breakdown: %s", failoverBreakdown(t, killed, vp, s.ns, moved.Name, pvName, backup, verifiedAt, firstAck))
	t.Logf("STORY 16 the new Pod's %s annotation: %q (empty: the webhook did not answer in time, e.g. a manager on the lost node)", "csi.tandem.dev/preferred-node", moved.Annotations["csi.tandem.dev/preferred-node"])
	if took > 30*time.Second {
		t.Errorf("the Pod wrote again %v after its node was lost, more than 30 s", took)
	}

	// The node comes back: resync, then a failback while the Pod writes
	// from the other node.
	s.lc("restore-node", primary)
	testkit.Eventually(t, 180*time.Second, "the pair in sync on "+backup, func() (bool, string) {
		vp := getVP()
		return inSync(backup)(vp), fmt.Sprintf("%+v", vp.Status)
	}, testkit.Every(500*time.Millisecond))
	mustKubectl(t, "annotate", "vp", handle, "-n", "tandem-system", v1.AnnotationFailbackRequested+"=e2e", "--overwrite")
	testkit.Eventually(t, 120*time.Second, "the writer back on "+primary, func() (bool, string) {
		vp := getVP()
		return inSync(primary)(vp), fmt.Sprintf("%+v", vp.Status)
	}, testkit.Every(500*time.Millisecond))
	afterFailback, _ := lastAck(recorderLog(t, backup, s.ns, moved.Name, string(moved.UID)))
	testkit.Eventually(t, 30*time.Second, "records acknowledged after the failback", func() (bool, string) {
		n, _ := lastAck(recorderLog(t, backup, s.ns, moved.Name, string(moved.UID)))
		return n >= afterFailback+20, fmt.Sprintf("last ack %d", n)
	}, testkit.Every(250*time.Millisecond))
	p, _ := podOf(t, s.ns, "recorder-0")
	if p == nil || p.UID != moved.UID || len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].RestartCount != 0 {
		t.Fatalf("the Pod did not keep running through the failback: %+v", p)
	}
	for _, l := range recorderLog(t, backup, s.ns, moved.Name, string(moved.UID)) {
		if l.verb == "error" {
			t.Fatal("the recorder saw an error across the failback")
		}
	}
	t.Logf("STORY 16 failback with the Pod running on %s: writer back on %s, records still acknowledged, no restart", backup, primary)

	// A Pod created now that mounts the claim prefers the writer's node
	// (the Pod placement webhook; a server-side dry run goes through it and
	// creates nothing). Retried a little: right after the node came back,
	// the webhook's Service may still name a manager that is not up.
	testkit.Eventually(t, 60*time.Second, "a new Pod of the claim prefers the writer "+primary, func() (bool, string) {
		probe := fmt.Sprintf(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"placement-probe","namespace":%q},
"spec":{"containers":[{"name":"c","image":"tandem-recorder"}],"volumes":[{"name":"d","persistentVolumeClaim":{"claimName":"data-recorder-0"}}]}}`, s.ns)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "kubectl"), "--kubeconfig", kubeconfig, "create", "--dry-run=server", "-o", "json", "-f", "-")
		cmd.Stdin = strings.NewReader(probe)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return false, fmt.Sprintf("%v: %s", err, stderr.String())
		}
		var p corev1.Pod
		if err := json.Unmarshal(out, &p); err != nil {
			return false, err.Error()
		}
		a := p.Annotations["csi.tandem.dev/preferred-node"]
		return strings.HasPrefix(a, primary+" (writer of claim data-recorder-0)"), fmt.Sprintf("annotation %q, affinity %+v", a, p.Spec.Affinity)
	}, testkit.Every(time.Second))

	// Deleting the workload and its claim detaches the volume first, then
	// deletes the PV and its VolumePair: nothing is left attached.
	mustKubectl(t, "delete", "statefulset", "recorder", "-n", s.ns, "--wait=true", "--timeout=90s")
	mustKubectl(t, "delete", "pvc", "--all", "-n", s.ns, "--wait=true", "--timeout=90s")
	testkit.Eventually(t, 120*time.Second, "the PV, its VolumeAttachments and its VolumePair gone", func() (bool, string) {
		left := strings.TrimSpace(mustKubectl(t, "get", "volumeattachments", "-o",
			`jsonpath={range .items[?(@.spec.source.persistentVolumeName=="`+pvName+`")]}{.metadata.name} on {.spec.nodeName}{"\n"}{end}`))
		pvLeft := strings.TrimSpace(mustKubectl(t, "get", "pv", pvName, "--ignore-not-found", "-o", "name"))
		vpLeft := strings.TrimSpace(mustKubectl(t, "get", "vp", handle, "-n", "tandem-system", "--ignore-not-found", "-o", "name"))
		return left == "" && pvLeft == "" && vpLeft == "", fmt.Sprintf("attachments %q, PV %q, VolumePair %q", left, pvLeft, vpLeft)
	}, testkit.Every(time.Second))
}

// mustApplyCluster applies a cluster-scoped manifest.
func mustApplyCluster(t *testing.T, manifest string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "m.yaml")
	if err := os.WriteFile(f, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	mustKubectl(t, "apply", "-f", f)
}

// failoverBreakdown says when each step of a pod failover happened, in
// seconds after the node was killed: the pair's failover, the new Pod, its
// scheduling, the VolumeAttachment to the new node, the attach the
// attach/detach controller reports, the container's start (these from the
// API, to the second), then the records verified and the first new record
// acknowledged (the Pod's log, to the millisecond).
func failoverBreakdown(t *testing.T, killed time.Time, vp *v1.VolumePair, ns, pod, pv, node string, verified, firstAck time.Time) string {
	var steps []string
	at := func(what string, when time.Time) {
		if !when.IsZero() {
			steps = append(steps, fmt.Sprintf("%s %+.1f", what, when.Sub(killed).Seconds()))
		}
	}
	if vp.Status.LastFailoverTime != nil {
		at("pair failed over", vp.Status.LastFailoverTime.Time)
	}
	// The manager's own events (events.k8s.io, to the microsecond): the
	// lost node fenced off the pair, the old Pod deleted.
	for _, q := range []struct{ ns, reason, what string }{{vp.Namespace, "ConsumerFenced", "node fenced"}, {ns, "PodFailover", "old Pod deleted"}} {
		if out, err := kubectl(t, "get", "events.events.k8s.io", "-n", q.ns, "-o", "json"); err == nil {
			var ev eventsv1.EventList
			if json.Unmarshal([]byte(out), &ev) == nil {
				for _, e := range ev.Items {
					if e.Reason == q.reason && e.EventTime.After(killed) && (q.reason != "ConsumerFenced" || e.Regarding.Name == vp.Name) {
						at(q.what, e.EventTime.Time)
					}
				}
			}
		}
	}
	if p, ok := podOf(t, ns, pod); ok {
		at("Pod created", p.CreationTimestamp.Time)
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionTrue {
				at("scheduled", c.LastTransitionTime.Time)
			}
		}
		if out, err := kubectl(t, "get", "volumeattachments", "-o", "json"); err == nil {
			var list struct {
				Items []struct {
					Metadata struct {
						CreationTimestamp time.Time `json:"creationTimestamp"`
					} `json:"metadata"`
					Spec struct {
						NodeName string `json:"nodeName"`
						Source   struct {
							PersistentVolumeName string `json:"persistentVolumeName"`
						} `json:"source"`
					} `json:"spec"`
				} `json:"items"`
			}
			if json.Unmarshal([]byte(out), &list) == nil {
				for _, va := range list.Items {
					if va.Spec.NodeName == node && va.Spec.Source.PersistentVolumeName == pv {
						at("VolumeAttachment", va.Metadata.CreationTimestamp)
					}
				}
			}
		}
		if out, err := kubectl(t, "get", "events", "-n", ns, "--field-selector", "involvedObject.uid="+string(p.UID), "-o", "json"); err == nil {
			var ev corev1.EventList
			if json.Unmarshal([]byte(out), &ev) == nil {
				for _, e := range ev.Items {
					if e.Reason == "SuccessfulAttachVolume" {
						at("attached", e.LastTimestamp.Time)
					}
				}
			}
		}
		for _, c := range p.Status.ContainerStatuses {
			if c.State.Running != nil {
				at("container started", c.State.Running.StartedAt.Time)
			}
		}
	}
	at("records verified", verified)
	at("first record acknowledged", firstAck)
	return strings.Join(steps, ", ") + " (s after the kill; API times to the second)"
}

// startRecorder makes the story a StorageClass that pins the members to
// primary and backup (allowedTopologies) with the extra parameters (YAML
// lines), and runs the recorder StatefulSet with a claim of size on it.
// Its Pod prefers primary, which becomes the pair's writer
// (WaitForFirstConsumer). The cleanup deletes all three.
func (s *story) startRecorder(primary, backup, params, size string) {
	t := s.t
	t.Helper()
	class := "tandem-" + s.ns
	if len(class) > 63 {
		class = class[:63]
	}
	mustApplyCluster(t, fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: %s
provisioner: csi.tandem.dev
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
allowVolumeExpansion: true
allowedTopologies:
- matchLabelExpressions:
  - key: csi.tandem.dev/node
    values: [%s, %s]
parameters:
  mode: Sync
%s`, class, primary, backup, params))
	t.Cleanup(func() { _, _ = kubectl(t, "delete", "storageclass", class, "--wait=false") })
	manifest, err := os.ReadFile(filepath.Join(root, "hack", "recorder", "statefulset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	s.apply(strings.NewReplacer("namespace: NAMESPACE", "namespace: "+s.ns, "[NODE]", "["+primary+"]",
		"storageClassName: STORAGE_CLASS", "storageClassName: "+class, "storage: 64Mi", "storage: "+size).Replace(string(manifest)))
	t.Cleanup(func() {
		_, _ = kubectl(t, "delete", "statefulset", "recorder", "-n", s.ns, "--wait=true", "--timeout=60s")
		_, _ = kubectl(t, "delete", "pvc", "--all", "-n", s.ns, "--wait=true", "--timeout=60s")
	})
}

// waitRecorder waits until recorder-0 of the story's namespace runs and has
// acknowledged at least acks records, and returns its Pod.
func (s *story) waitRecorder(acks int64) *corev1.Pod {
	t := s.t
	t.Helper()
	var pod *corev1.Pod
	testkit.Eventually(t, 180*time.Second, "recorder-0 running and acknowledging records", func() (bool, string) {
		p, ok := podOf(t, s.ns, "recorder-0")
		if !ok || p.Status.Phase != corev1.PodRunning {
			return false, fmt.Sprintf("pod %v", p != nil)
		}
		pod = p
		n, _ := lastAck(recorderLog(t, p.Spec.NodeName, s.ns, p.Name, string(p.UID)))
		return n >= acks, fmt.Sprintf("on %s, last ack %d", p.Spec.NodeName, n)
	}, testkit.Every(500*time.Millisecond))
	return pod
}
