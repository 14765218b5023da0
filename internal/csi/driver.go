package csi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// DriverName is the CSI driver's name: the StorageClass's provisioner and
// the CSIDriver object's name.
const DriverName = "csi.tandem.dev"

// TopologyKey is the topology segment every node reports: its name.
const TopologyKey = DriverName + "/node"

// Annotations and labels the driver puts on the VolumePairs it creates.
const (
	// AnnVolumeName is the CreateVolume request's name.
	AnnVolumeName = DriverName + "/volume-name"
	// AnnPVC ("namespace/name") and AnnPVName name the claim and volume
	// the provisioner created the VolumePair for (kubectl get vp -o wide
	// shows the claim).
	AnnPVC    = DriverName + "/pvc"
	AnnPVName = DriverName + "/pv-name"
	// AnnPodFailover is "false" when the StorageClass opted out of the
	// workload failover.
	AnnPodFailover = DriverName + "/pod-failover"
	// LabelManagedBy marks VolumePairs the driver created.
	LabelManagedBy = "app.kubernetes.io/managed-by"
)

// Identity serves the CSI identity service of both the controller and the
// node plugin.
type Identity struct {
	csi.UnimplementedIdentityServer
	// Version is reported by GetPluginInfo.
	Version string
	// Controller is true in the controller plugin: it advertises
	// CONTROLLER_SERVICE and VOLUME_ACCESSIBILITY_CONSTRAINTS. Both
	// plugins advertise online volume expansion (VolumeExpansion ONLINE).
	Controller bool
	// Ready reports whether the plugin can serve now (Probe); nil is ready.
	Ready func(context.Context) error
}

// GetPluginInfo returns the driver's name and version.
func (i *Identity) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	v := i.Version
	if v == "" {
		v = "dev"
	}
	return &csi.GetPluginInfoResponse{Name: DriverName, VendorVersion: v}, nil
}

// GetPluginCapabilities says which services this plugin serves.
func (i *Identity) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	var caps []*csi.PluginCapability
	if i.Controller {
		for _, t := range []csi.PluginCapability_Service_Type{
			csi.PluginCapability_Service_CONTROLLER_SERVICE,
			csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS,
		} {
			caps = append(caps, &csi.PluginCapability{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: t}}})
		}
	}
	caps = append(caps, &csi.PluginCapability{Type: &csi.PluginCapability_VolumeExpansion_{
		VolumeExpansion: &csi.PluginCapability_VolumeExpansion{Type: csi.PluginCapability_VolumeExpansion_ONLINE}}})
	return &csi.GetPluginCapabilitiesResponse{Capabilities: caps}, nil
}

// Probe reports readiness.
func (i *Identity) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	if i.Ready != nil {
		if err := i.Ready(ctx); err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "not ready: %v", err)
		}
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

// Listen opens a CSI endpoint: "unix:///path/csi.sock" or a plain path
// (a stale socket file is removed first), or "tcp://host:port".
func Listen(endpoint string) (net.Listener, error) {
	network, addr := "unix", endpoint
	if u, err := url.Parse(endpoint); err == nil && u.Scheme != "" {
		switch u.Scheme {
		case "unix":
			addr = u.Path
			if addr == "" {
				addr = u.Opaque
			}
		case "tcp":
			network, addr = "tcp", u.Host
		default:
			return nil, fmt.Errorf("CSI endpoint %q: scheme %q is neither unix nor tcp", endpoint, u.Scheme)
		}
	}
	if network == "unix" {
		if !filepath.IsAbs(addr) {
			return nil, fmt.Errorf("CSI endpoint %q: the socket path must be absolute", endpoint)
		}
		if err := os.MkdirAll(filepath.Dir(addr), 0o750); err != nil {
			return nil, fmt.Errorf("CSI endpoint %q: %w", endpoint, err)
		}
		if err := os.Remove(addr); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("CSI endpoint %q: removing the old socket: %w", endpoint, err)
		}
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("CSI endpoint %q: %w", endpoint, err)
	}
	return ln, nil
}

// Services are the CSI services one plugin serves; nil ones are left out.
type Services struct {
	Identity   csi.IdentityServer
	Controller csi.ControllerServer
	Node       csi.NodeServer
}

// Serve serves the services on ln until ctx is done, logging every call
// that fails.
func Serve(ctx context.Context, ln net.Listener, s Services, log logr.Logger) error {
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		resp, err := h(ctx, req)
		method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
		if err != nil {
			log.Info("CSI call failed", "method", method, "code", status.Code(err).String(), "error", status.Convert(err).Message())
		} else if !strings.HasPrefix(method, "Probe") && !strings.HasSuffix(method, "Capabilities") && method != "GetPluginInfo" && method != "NodeGetInfo" {
			log.V(1).Info("CSI call", "method", method)
		}
		return resp, err
	}))
	if s.Identity != nil {
		csi.RegisterIdentityServer(srv, s.Identity)
	}
	if s.Controller != nil {
		csi.RegisterControllerServer(srv, s.Controller)
	}
	if s.Node != nil {
		csi.RegisterNodeServer(srv, s.Node)
	}
	stop := context.AfterFunc(ctx, srv.GracefulStop)
	defer stop()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serving CSI on %s: %w", ln.Addr(), err)
	}
	return nil
}
