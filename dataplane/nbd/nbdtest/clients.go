// Package nbdtest helps tests drive Tandem's NBD exports with real NBD
// clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio, nbdkit).
package nbdtest

import (
	"os"
	"os/exec"
	"testing"
)

// RequireEnv is the environment variable that turns a missing client into a
// test failure instead of a skip. CI sets it to 1.
const RequireEnv = "TANDEM_REQUIRE_NBD_CLIENTS"

// Require returns the path of the client binary name (looked up in PATH).
// If it is missing the test is skipped, or fails when RequireEnv is "1".
// The Debian packages are qemu-utils, libnbd-bin, fio and nbdkit.
func Require(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("NBD client %s is required (%s=1) but not found: %v; install qemu-utils libnbd-bin fio nbdkit", name, RequireEnv, err)
	}
	t.Skipf("NBD client %s not found (%v); install qemu-utils libnbd-bin fio nbdkit, or set %s=1 to make this a failure", name, err, RequireEnv)
	return ""
}
