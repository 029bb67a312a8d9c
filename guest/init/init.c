// SPDX-License-Identifier: MIT
/*
 * wisp guest /init (PID 1).
 *
 * Built by scripts/build-guest.sh as a tiny static binary against Linux's
 * header-only libc (tools/include/nolibc), so no libc start-up code runs:
 * on the project's emulated-KVM hosts every guest syscall and page fault
 * costs ~0.3-2 ms, so the path to "boot complete" is kept to a handful of
 * syscalls.
 *
 * Order:
 *   1. mount proc, sysfs, devtmpfs;
 *   2. tell the VMM "boot complete": outb(0x7b, 0x501)  (needs ioperm);
 *   3. print WISP-READY on the console;
 *   4. optional /etc/init.d/rcS (busybox sh), then an interactive busybox
 *      shell on the console as a session leader with a controlling tty
 *      (so Ctrl-C works), respawned whenever it exits.
 */

#ifndef NOLIBC
#error "build with -include tools/include/nolibc/nolibc.h"
#endif

#include "console.h"

#define WISP_BOOT_PORT  0x501
#define WISP_BOOT_VALUE 0x7b

#define BUSYBOX "/bin/busybox"

static char *const shell_env[] = {
	"PATH=/sbin:/bin:/usr/sbin:/usr/bin",
	"HOME=/root",
	"TERM=vt100",
	"SHELL=/bin/sh",
	"USER=root",
	"LOGNAME=root",
	0,
};

static void say(int fd, const char *s)
{
	write(fd, s, strlen(s));
}

static void boot_complete(void)
{
	unsigned short port = WISP_BOOT_PORT;
	unsigned char val = WISP_BOOT_VALUE;

	/* ioperm(from, num, turn_on): no nolibc wrapper, use the raw syscall */
	if (my_syscall3(__NR_ioperm, WISP_BOOT_PORT, 1, 1) != 0) {
		say(2, "init: ioperm failed\n");
		return;
	}
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static pid_t spawn(char *const argv[], const char *tty)
{
	pid_t pid = fork();

	if (pid != 0)
		return pid;

	/* child */
	if (tty)
		take_console(tty);
	execve(BUSYBOX, argv, shell_env);
	say(2, "init: cannot exec " BUSYBOX "\n");
	exit(127);
}

/* wait for pid, reaping any orphans that PID 1 inherits meanwhile */
static void wait_for(pid_t pid)
{
	int status;
	pid_t r;

	for (;;) {
		r = wait4(-1, &status, 0, 0);
		if (r == pid || (r < 0 && errno == ECHILD))
			return;
	}
}

int main(int argc, char **argv, char **envp)
{
	static char *const rcs_argv[] = { "sh", "/etc/init.d/rcS", 0 };
	static char *const sh_argv[] = { "-sh", 0 };
	char tty[32];
	struct stat st;

	(void)argc; (void)argv; (void)envp;

	mount("proc", "/proc", "proc", 0, 0);
	mount("sysfs", "/sys", "sysfs", 0, 0);
	mount("devtmpfs", "/dev", "devtmpfs", 0, 0);

	boot_complete();
	say(1, "WISP-READY\n");

	/* not needed for WISP-READY; fails harmlessly without UNIX98_PTYS */
	mkdir("/dev/pts", 0755);
	mount("devpts", "/dev/pts", "devpts", 0, "gid=5,mode=620,ptmxmode=666");
	my_syscall2(__NR_sethostname, "wisp", 4);

	if (stat("/etc/init.d/rcS", &st) == 0)
		wait_for(spawn(rcs_argv, 0));

	console_path(tty, sizeof(tty), "/dev/");
	for (;;) {
		pid_t pid = spawn(sh_argv, tty);

		if (pid < 0) {
			say(2, "init: fork failed\n");
			sleep(1);
			continue;
		}
		wait_for(pid);
	}
	return 0;
}
