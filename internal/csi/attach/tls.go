package attach

import (
	"crypto/tls"
	"fmt"
	"sync"

	"github.com/go-logr/logr"

	"github.com/tandem-storage/tandem/dataplane/nbd"
	"github.com/tandem-storage/tandem/internal/tlsid"
)

// TLSConfig returns the TLS config a volume's connections upgrade with
// (NBD_OPT_STARTTLS), or nil for plain text. An error fails the connection
// attempt: a node plugin told to use TLS never falls back to plain text.
type TLSConfig func() (*tls.Config, error)

// clientOptions are the nbd handshake options for tlsConfig (nil: none).
func clientOptions(tlsConfig TLSConfig) ([]nbd.ClientOption, error) {
	if tlsConfig == nil {
		return nil, nil
	}
	cfg, err := tlsConfig()
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		return nil, nil
	}
	return []nbd.ClientOption{nbd.WithTLS(cfg)}, nil
}

// NodeTLS is the TLS config of the node plugin's NBD connections: the
// certificate of this node's agent (tlsid's directory layout: the agent's
// <data-dir>/tls with --tls-issue, or its --tls-dir), which names the node.
// The directory is read on the first connection (the agent may write it
// after the plugin started) and watched from then on; the server must
// present a certificate of the bundle naming a node's agent.
type NodeTLS struct {
	Dir string
	Log logr.Logger
	// Watch is started once the material is loaded (tlsid.Source.Watch
	// with a context the caller owns).
	Watch func(*tlsid.Source)

	mu  sync.Mutex
	src *tlsid.Source
}

// Config implements TLSConfig.
func (n *NodeTLS) Config() (*tls.Config, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.src == nil {
		src, err := tlsid.Load(n.Dir)
		if err != nil {
			return nil, fmt.Errorf("NBD over TLS (--tls-dir): %w (the node's agent writes its certificate there with --tls-issue)", err)
		}
		if _, ok := src.Identity().Node(); !ok {
			return nil, fmt.Errorf("NBD over TLS (--tls-dir): the certificate in %s names %s, not a node", n.Dir, src.Identity())
		}
		n.src = src
		n.Log.Info("NBD connections use TLS", "dir", n.Dir, "identity", src.Identity(), "notAfter", src.NotAfter())
		if n.Watch != nil {
			n.Watch(src)
		}
	}
	return n.src.ClientConfig(func(id tlsid.Identity) error {
		if _, ok := id.Node(); !ok {
			return fmt.Errorf("the NBD server presented %s, not a node's agent", id)
		}
		return nil
	}), nil
}
