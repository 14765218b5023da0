package agentapi_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestControlPlaneLinksNoDataplane: the reason this package exists is that
// the controller and the plugin talk to agents without linking the agent
// (the NBD server, bitmaps, stores). Neither this package nor those
// commands may import a dataplane package, directly or not.
func TestControlPlaneLinksNoDataplane(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go command: %v", err)
	}
	const module = "github.com/tandem-storage/tandem/"
	pkgs := []string{module + "pkg/agentapi", module + "cmd/manager", module + "cmd/kubectl-tandem"}
	out, err := exec.Command(goTool, append([]string{"list", "-deps", "-f", "{{.ImportPath}}"}, pkgs...)...).Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, module+"dataplane/") {
			t.Errorf("%s is linked into one of %v", p, pkgs)
		}
	}
}
