package main

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/tandem-storage/tandem/internal/csi"
)

type namedAttacher string

func (namedAttacher) Attach(context.Context, csi.Volume) (string, error) { return "", nil }
func (namedAttacher) Detach(context.Context, string) error               { return nil }
func (namedAttacher) Attached() []string                                 { return nil }

// TestChooseAttacher: --attach picks the kernel path where the kernel has
// an NBD driver, user space where it has none (auto says why), and fails
// when the kernel path is demanded and missing.
func TestChooseAttacher(t *testing.T) {
	noNBD := errors.New(`the kernel's NBD driver (generic netlink family "nbd"; is module nbd loaded?): no such file`)
	for _, c := range []struct {
		want      string
		kernelErr error
		got       namedAttacher
		path, err string
	}{
		{want: "auto", got: "kernel", path: "kernel NBD"},
		{want: "auto", kernelErr: noNBD, got: "user", path: "user-space (FUSE file + loop device): the kernel's NBD driver"},
		{want: "kernel", got: "kernel", path: "kernel NBD"},
		{want: "kernel", kernelErr: noNBD, err: "--attach=kernel: the kernel's NBD driver"},
		{want: "user-space", got: "user", path: "user-space (FUSE file + loop device): --attach=user-space"},
		{want: "nbd", err: `--attach="nbd": want auto, kernel or user-space`},
	} {
		t.Run(c.want+"/"+string(c.got), func(t *testing.T) {
			a, path, err := chooseAttacher(c.want, func() (nodeAttacher, error) {
				if c.kernelErr != nil {
					return nil, c.kernelErr
				}
				return namedAttacher("kernel"), nil
			}, func() nodeAttacher { return namedAttacher("user") })
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("error %v, want %q", err, c.err)
				}
				return
			}
			if err != nil || a != c.got || !strings.HasPrefix(path, c.path) {
				t.Fatalf("got %v %q %v, want %s %q", a, path, err, c.got, c.path)
			}
		})
	}
}
