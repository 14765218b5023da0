package agent

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	coreclient "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// fakeNodes tells the reflector what the fake Clientset does: it cannot
// stream a watch-list (client-go's WatchListClient).
type fakeNodes struct{ coreclient.NodesGetter }

func (fakeNodes) IsWatchListSemanticsUnSupported() bool { return true }

func testNode(name, ip, podCIDR string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}, {Type: corev1.NodeHostName, Address: name}}
	if podCIDR != "" {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = podCIDR, []string{podCIDR}
	}
	return n
}

// TestWatchNodes: with --nbd-allowed-clients=nodes the NBD port admits the
// cluster's nodes and their Pods as the API server lists them, a node added
// later as soon as the watch delivers it, and no longer one deleted.
func TestWatchNodes(t *testing.T) {
	cs := fake.NewClientset(testNode("node-a", "198.18.0.11", "10.244.1.0/24"))
	list, err := nbd.ParseAllowList("nodes")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); WatchNodes(ctx, fakeNodes{cs.CoreV1()}, list, logr.Discard()) }()
	defer func() { cancel(); <-done }()

	admits := func(what, addr string, want bool) {
		t.Helper()
		a := netip.MustParseAddr(addr)
		testkit.Eventually(t, 10*time.Second, what, func() (bool, string) {
			return list.Allowed(a) == want, list.String()
		}, testkit.Every(10*time.Millisecond))
	}
	admits("node-a admitted", "198.18.0.11", true)
	admits("node-a's Pods admitted", "10.244.1.9", true)
	if list.Allowed(netip.MustParseAddr("198.18.0.12")) || list.Allowed(netip.MustParseAddr("203.0.113.5")) {
		t.Fatalf("admits a host that is no node: %s", list)
	}
	if _, err := cs.CoreV1().Nodes().Create(ctx, testNode("node-b", "198.18.0.12", ""), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	admits("node-b admitted once it joins", "198.18.0.12", true)
	if err := cs.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	admits("node-a refused once deleted", "198.18.0.11", false)
	admits("node-a's Pods refused once deleted", "10.244.1.9", false)
	if !list.Allowed(netip.MustParseAddr("127.0.0.1")) {
		t.Fatal("loopback (this node) refused")
	}
}

func TestNodeNetworks(t *testing.T) {
	got := NodeNetworks([]any{
		testNode("b", "198.18.0.12", "10.244.2.0/24"),
		testNode("a", "198.18.0.11", "10.244.1.0/24"),
		&corev1.Node{Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Address: "198.18.0.11"}, {Address: "::ffff:198.18.0.13"}, {Address: "not-an-ip"}}}},
	})
	want := []string{"10.244.1.0/24", "10.244.2.0/24", "198.18.0.11/32", "198.18.0.12/32", "198.18.0.13/32"}
	if len(got) != len(want) {
		t.Fatalf("NodeNetworks = %v, want %v", got, want)
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Fatalf("NodeNetworks = %v, want %v", got, want)
		}
	}
}
