package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/go-logr/logr"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// Registration answers the kubelet's plugin watcher for the node plugin:
// the work of the node-driver-registrar sidecar, in process. The kubelet
// finds the socket in its plugins_registry directory, asks GetInfo, then
// connects to the CSI endpoint and calls NodeGetInfo.
type Registration struct {
	registerapi.UnimplementedRegistrationServer
	// Endpoint is the CSI socket's path as the kubelet sees it.
	Endpoint string
	Log      logr.Logger
	// Registered is called with the kubelet's verdict (optional).
	Registered func(ok bool, reason string)
}

// GetInfo describes the plugin.
func (r *Registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: DriverName, Endpoint: r.Endpoint, SupportedVersions: []string{"1.0.0"}}, nil
}

// NotifyRegistrationStatus logs whether the kubelet took the plugin.
func (r *Registration) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if st.PluginRegistered {
		r.Log.Info("Registered with the kubelet", "driver", DriverName, "endpoint", r.Endpoint)
	} else {
		r.Log.Error(errors.New(st.Error), "The kubelet refused the CSI node plugin", "driver", DriverName)
	}
	if r.Registered != nil {
		r.Registered(st.PluginRegistered, st.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// ServeRegistration serves the registration socket
// <registryDir>/csi.tandem.dev-reg.sock until ctx is done, and removes it
// then (the kubelet unregisters a plugin whose socket goes).
func ServeRegistration(ctx context.Context, registryDir string, r *Registration) error {
	sock := filepath.Join(registryDir, DriverName+"-reg.sock")
	ln, err := Listen("unix://" + sock)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, r)
	stop := context.AfterFunc(ctx, func() {
		srv.Stop()
		_ = os.Remove(sock)
	})
	defer stop()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serving the registration socket %s: %w", sock, err)
	}
	return nil
}

// WriterResolver returns a function that reads a VolumePair's
// status.endpoint: where the volume's writer serves now.
func WriterResolver(c client.Reader) func(Volume) func(context.Context) (string, error) {
	return func(vol Volume) func(context.Context) (string, error) {
		return func(ctx context.Context) (string, error) {
			vp := &v1.VolumePair{}
			if err := c.Get(ctx, vol.Pair, vp); err != nil {
				return "", fmt.Errorf("reading VolumePair %s: %w", vol.Pair, err)
			}
			if vp.Status.Endpoint == "" {
				why := "no member accepts writes"
				for _, cond := range vp.Status.Conditions {
					if cond.Type == v1.ConditionReady && cond.Message != "" {
						why = cond.Message
					}
				}
				return "", fmt.Errorf("VolumePair %s has no endpoint (phase %s): %s", vol.Pair, vp.Status.Phase, why)
			}
			return vp.Status.Endpoint, nil
		}
	}
}

// NodePlugin is the node side of the driver as the agent DaemonSet runs
// it: the CSI identity and node services on Endpoint, the registration
// socket in RegistryDir.
type NodePlugin struct {
	Node        *Node
	Endpoint    string // unix:// URL of the CSI socket
	RegistryDir string // the kubelet's plugins_registry ("" skips registration)
	Version     string
	Log         logr.Logger
}

// Run serves until ctx is done.
func (p *NodePlugin) Run(ctx context.Context) error {
	ln, err := Listen(p.Endpoint)
	if err != nil {
		return err
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return Serve(ctx, ln, Services{Identity: &Identity{Version: p.Version}, Node: p.Node}, p.Log)
	})
	if p.RegistryDir != "" {
		path := ln.Addr().String()
		g.Go(func() error {
			return ServeRegistration(ctx, p.RegistryDir, &Registration{Endpoint: path, Log: p.Log})
		})
	}
	return g.Wait()
}
