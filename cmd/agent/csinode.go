package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"go.uber.org/zap/zapcore"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/csi/attach"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

// runCSINode serves the CSI node plugin ("agent csi-node"): a second
// container of the agent DaemonSet's Pod, privileged (it mounts, and its
// mounts propagate to the kubelet), next to the unprivileged agent.
func runCSINode(args []string) error {
	host, _ := os.Hostname()
	fs := flag.NewFlagSet("csi-node", flag.ExitOnError)
	node := fs.String("node", envOr("NODE_NAME", host), "This node's Kubernetes name (the CSI node ID).")
	endpoint := fs.String("csi-endpoint", "unix:///var/lib/kubelet/plugins/"+csi.DriverName+"/csi.sock", "The CSI socket the kubelet connects to.")
	registry := fs.String("registration-dir", "/var/lib/kubelet/plugins_registry", "The kubelet's plugin registration directory; empty: do not register (tests, or a node-driver-registrar sidecar does it).")
	stateDir := fs.String("state-dir", "/var/lib/tandem/csi", "Where staged volumes are recorded and their FUSE files mounted.")
	namespace := fs.String("namespace", os.Getenv("POD_NAMESPACE"), "The driver's namespace: where the VolumePairs of provisioned volumes live.")
	kubeconfig := fs.String("kubeconfig", "", "Kubeconfig file (default: in-cluster config).")
	ioTimeout := fs.Duration("io-timeout", attach.DefaultIOTimeout, "How long a volume request waits for a writer (across a failover or a switchover) before the filesystem gets EIO.")
	tlsDir := fs.String("tls-dir", "", "Upgrade every NBD connection to TLS (NBD_OPT_STARTTLS) with this node's agent certificate: the agent's <data-dir>/tls with --tls-issue, or its --tls-dir (tls.crt, tls.key, ca.crt; read again every 5 s). The writer must present a certificate of the CA naming a node. Empty: plain NBD.")
	attachPath := fs.String("attach", "auto", "How volumes become block devices: kernel (the kernel's NBD client, /dev/nbdN), user-space (a FUSE file with a loop device, for kernels without NBD), or auto (kernel when the kernel has an NBD client, else user-space).")
	opts := zap.Options{TimeEncoder: zapcore.RFC3339NanoTimeEncoder}
	opts.BindFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := zap.New(zap.UseFlagOptions(&opts)).WithName("csi-node")
	if *namespace == "" {
		return fmt.Errorf("--namespace (or POD_NAMESPACE) is required")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client config: %w", err)
	}
	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(v1.AddToScheme(scheme))
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	resolve := csi.WriterResolver(c)
	resolver := func(v csi.Volume) attach.Resolver { return resolve(v) }
	// The node fences a volume to itself when it stages it (the CSIDriver's
	// attachRequired is false): the same publish the controller service
	// does for a VolumeAttachment, through this plugin's own client.
	nodeSvc := &csi.Node{NodeID: *node, Client: c, Namespace: *namespace, Mounter: csi.LinuxMounter{}, StateDir: *stateDir,
		Publisher: &csi.Controller{Client: c, Namespace: *namespace}}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var tlsConfig attach.TLSConfig
	if *tlsDir != "" {
		tlsLog := log.WithName("tls")
		tlsConfig = (&attach.NodeTLS{Dir: *tlsDir, Log: tlsLog, Watch: func(src *tlsid.Source) {
			go src.Watch(ctx, tlsid.ReloadEvery, tlsLog)
		}}).Config
	}
	attacher, path, err := chooseAttacher(*attachPath, func() (nodeAttacher, error) {
		return attach.NewKernel(attach.KernelOptions{IOTimeout: *ioTimeout, Log: log.WithName("attach"), Resolver: resolver, Lookup: nodeSvc.Volume, TLS: tlsConfig})
	}, func() nodeAttacher {
		return &attach.UserSpace{Dir: filepath.Join(*stateDir, "fuse"), IOTimeout: *ioTimeout, Log: log.WithName("attach"), Resolver: resolver, TLS: tlsConfig}
	})
	if err != nil {
		return err
	}
	log.Info("Attach path", "path", path, "nbdTLS", *tlsDir != "")
	nodeSvc.Attacher = attacher
	p := &csi.NodePlugin{Node: nodeSvc, Endpoint: *endpoint, RegistryDir: *registry, Log: log}
	go csi.Heartbeat(ctx, c, *namespace, *node, map[string]string{csi.AnnotationAttachPath: path}, nil, log.WithName("heartbeat"))
	err = p.Run(ctx)
	if n := attacher.Attached(); len(n) > 0 {
		if _, kernel := attacher.(*attach.Kernel); kernel {
			log.Info("Stopping with volumes attached; the kernel keeps serving them, and the next run follows their writers again", "volumes", n)
		} else {
			// Their FUSE files go with this process.
			log.Info("Stopping with volumes attached; their I/O fails until they are staged again", "volumes", n, "grace", 5*time.Second)
		}
	}
	return err
}

// nodeAttacher is what the node plugin needs of an attach path.
type nodeAttacher interface {
	csi.Attacher
	Attached() []string
}

// chooseAttacher picks the attach path the --attach flag asks for, and says
// which it is and why.
func chooseAttacher(want string, kernel func() (nodeAttacher, error), userSpace func() nodeAttacher) (nodeAttacher, string, error) {
	switch want {
	case "kernel":
		a, err := kernel()
		if err != nil {
			return nil, "", fmt.Errorf("--attach=kernel: %w", err)
		}
		return a, "kernel NBD (/dev/nbdN)", nil
	case "user-space":
		return userSpace(), "user-space (FUSE file + loop device): --attach=user-space", nil
	case "auto":
		a, err := kernel()
		if err != nil {
			return userSpace(), "user-space (FUSE file + loop device): " + err.Error(), nil
		}
		return a, "kernel NBD (/dev/nbdN)", nil
	}
	return nil, "", fmt.Errorf("--attach=%q: want auto, kernel or user-space", want)
}
