package attach

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
)

// relayTLS gives the kernel's NBD client a socket for a connection it
// cannot speak itself (TLS: the kernel has no TLS for NBD). It returns one
// end of a socketpair for the kernel; the node plugin copies between the
// other end and conn in both directions, as nbd-client's TLS proxy does.
// The relay ends, closing both, when either side closes or fails: the
// kernel dropping its socket (disconnect, reconfigure) closes conn, and a
// dead conn closes the kernel's socket, which the kernel's dead-link
// handling notices as it would a dead TCP connection.
func relayTLS(conn net.Conn, log logr.Logger) (*os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair for the TLS relay: %w", err)
	}
	kernel := os.NewFile(uintptr(fds[0]), "nbd-tls-relay-kernel")
	mine := os.NewFile(uintptr(fds[1]), "nbd-tls-relay")
	local, err := net.FileConn(mine)
	mine.Close() // FileConn made its own duplicate
	if err != nil {
		kernel.Close()
		return nil, fmt.Errorf("socketpair for the TLS relay: %w", err)
	}
	var once sync.Once
	stop := func(err error) {
		once.Do(func() {
			_ = local.Close()
			_ = conn.Close()
			log.V(1).Info("TLS relay closed", "reason", fmt.Sprint(err))
		})
	}
	go func() {
		_, err := io.Copy(conn, local)
		stop(err)
	}()
	go func() {
		_, err := io.Copy(local, conn)
		stop(err)
	}()
	return kernel, nil
}
