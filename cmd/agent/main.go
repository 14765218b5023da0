// Command agent is Tandem's per-node dataplane agent: it stores replicas,
// serves the active primary over NBD, mirrors writes to the peer and answers
// the controller's control API (see package dataplane/agent).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/zap/zapcore"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/nbd"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "tandem agent: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	host, _ := os.Hostname()
	node := flag.String("node", envOr("NODE_NAME", host), "This agent's Kubernetes node name.")
	dataDir := flag.String("data-dir", "/var/lib/tandem", "Directory holding the replicas.")
	controlAddr := flag.String("control-address", ":7400", "Listen address of the control API (HTTP).")
	replAddr := flag.String("replication-address", ":7401", "Listen address of the replication link.")
	nbdAddr := flag.String("nbd-address", ":10809", "Listen address of the NBD server.")
	tokenFile := flag.String("token-file", "", "File holding the shared bearer token for the control API and replication; required unless --insecure-no-auth.")
	noAuth := flag.Bool("insecure-no-auth", false, "Run without authentication (tests on loopback only).")
	opts := zap.Options{TimeEncoder: zapcore.RFC3339NanoTimeEncoder}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	log := zap.New(zap.UseFlagOptions(&opts)).WithName("agent")

	var token string
	switch {
	case *tokenFile != "":
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return fmt.Errorf("read token file: %w", err)
		}
		token = strings.TrimSpace(string(b))
		if token == "" {
			return fmt.Errorf("token file %s is empty", *tokenFile)
		}
	case !*noAuth:
		return errors.New("--token-file is required (or --insecure-no-auth for loopback tests)")
	}

	a, err := agent.New(agent.Config{Node: *node, DataDir: *dataDir, Token: token, Log: log})
	if err != nil {
		return err
	}
	defer func() {
		if err := a.Close(); err != nil {
			log.Error(err, "Closing replicas")
		}
	}()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	cl, err := net.Listen("tcp", *controlAddr)
	if err != nil {
		return fmt.Errorf("control listener: %w", err)
	}
	rl, err := net.Listen("tcp", *replAddr)
	if err != nil {
		return fmt.Errorf("replication listener: %w", err)
	}
	nl, err := net.Listen("tcp", *nbdAddr)
	if err != nil {
		return fmt.Errorf("NBD listener: %w", err)
	}
	a.SetAddresses(nl.Addr().String(), rl.Addr().String(), cl.Addr().String())

	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second}
	nbdSrv := &nbd.Server{Exports: a, Log: log.WithName("nbd")}
	errc := make(chan error, 3)
	go func() { errc <- ignoreClosed(srv.Serve(cl)) }()
	go func() { errc <- a.ServeReplication(ctx, rl) }()
	go func() { errc <- nbdSrv.Serve(ctx, nl) }()
	log.Info("Agent started", "node", *node, "dataDir", *dataDir, "control", cl.Addr().String(),
		"replication", rl.Addr().String(), "nbd", nl.Addr().String(), "auth", token != "")

	select {
	case <-ctx.Done():
		log.Info("Shutting down")
	case err = <-errc:
		log.Error(err, "Listener failed; shutting down")
	}
	shutdown(log, srv)
	return err
}

func shutdown(log logr.Logger, srv *http.Server) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Error(err, "Control API shutdown")
	}
}

func ignoreClosed(err error) error {
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
