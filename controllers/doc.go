// Package controllers will hold the VolumePair reconciler (issue #4): it probes
// each member's agent, holds the per-pair authority Lease with its epoch,
// fences a lost primary, and drives the phases PAIR → SWAP → COPY → NORMAL →
// PAIR, writing status a user can read with kubectl.
package controllers
