// Command pause is the pod sandbox's process (the image tandem.local/pause:1
// that `make image` writes): it does nothing until SIGTERM or SIGINT, then
// exits 0. As PID 1 of a pod's PID namespace it also reaps the zombies the
// namespace's other processes leave behind.
//
// Build it static: CGO_ENABLED=0 go build -trimpath -ldflags='-s -w'.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-v" || os.Args[1] == "--version") {
		fmt.Println("tandem pause 1")
		return
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	reap() // children that exited before Notify
	for s := range sigs {
		if s == syscall.SIGCHLD {
			reap()
			continue
		}
		os.Exit(0)
	}
}

// reap collects every exited child without blocking. SIGCHLD signals
// coalesce, so one signal may stand for several children.
func reap() {
	if os.Getpid() != 1 {
		return
	}
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
	}
}
