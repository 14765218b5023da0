//go:build e2e

package e2e

import (
	"bytes"
	"io"
	"net"
	"os/exec"
	"testing"
	"time"
)

// nbdGreeting dials an agent's NBD port from src ("" : the kernel's choice)
// and returns the first bytes the server sends (an allowed client gets the
// NBD greeting, "NBDMAGIC..."; a refused one is closed before it).
func nbdGreeting(t *testing.T, src, node string) []byte {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	c, err := d.Dial("tcp", net.JoinHostPort(nodeIP(node), "10809"))
	if err != nil {
		t.Fatalf("dial %s's NBD port from %q: %v", node, src, err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(io.LimitReader(c, 8))
	return b
}

// Story 20 (issue #18): the NBD port admits the cluster's nodes (and the
// host the stories run their clients on, which the local cluster's install
// adds) and refuses every other client before the handshake, by default.
func TestStory20NBDAllowList(t *testing.T) {
	if !netnsCluster() {
		t.Fatalf("the local cluster has no network namespaces (node-a at %s): this story needs them", nodeIP("node-a"))
	}
	// An address on the host that is neither a node nor admitted: one more
	// on the local cluster's bridge, for this story only.
	const outsider = "198.18.0.250"
	if out, err := exec.Command("ip", "addr", "add", outsider+"/32", "dev", "tandem-br0").CombinedOutput(); err != nil {
		t.Fatalf("ip addr add: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "addr", "del", outsider+"/32", "dev", "tandem-br0").Run() })

	if b := nbdGreeting(t, "", "node-a"); !bytes.Equal(b, []byte("NBDMAGIC")) {
		t.Fatalf("the host (admitted) got %q, not the NBD greeting", b)
	}
	if b := nbdGreeting(t, outsider, "node-a"); len(b) != 0 {
		t.Fatalf("a client at %s (no node, not admitted) got %q: it should be closed before the greeting", outsider, b)
	}
	// From a node (node-b's network namespace): the greeting.
	out, err := exec.Command("timeout", "10", "nsenter", "--net=/run/netns/tandem-node-b", "bash", "-c",
		"exec 3<>/dev/tcp/"+nodeIP("node-a")+"/10809 && head -c 8 <&3").CombinedOutput()
	if err != nil || string(out) != "NBDMAGIC" {
		t.Fatalf("node-b got %q (%v), not the NBD greeting", out, err)
	}
	t.Logf("STORY 20 NBD allow-list: the host and node-b admitted, %s refused before the greeting", outsider)
}
