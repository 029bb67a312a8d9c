// SPDX-License-Identifier: MIT
/*
 * wisp image init (PID 1 of a `wisp run --image` guest).
 *
 * Built by scripts/build-guest.sh against Linux's header-only libc
 * (tools/include/nolibc) into target/guest/image-init.cpio. wisp appends a
 * second cpio holding /wisp/run, the process to start: pairs of NUL-ended
 * strings, key then value:
 *   disk     the image's ext4 disk (read-only), e.g. /dev/vda
 *   arg      one argv word (repeated, in order; the first is the program)
 *   env      one NAME=value (repeated)
 *   cwd      working directory
 *   uid, gid numeric user and group
 *   group    one supplementary group (repeated; none: no supplementary groups)
 *   hostname the guest's host name
 *   dir      a directory to create in the image (a bind mount's), e.g. /data
 *   file     "MODE PATH": a bind-mounted file, copied from /wisp/files/N (N
 *            counts the file keys from 0) to PATH in the image, MODE in octal
 *   tty      "raw": the console in raw mode for the process (no echo, no
 *            line editing, bytes out unchanged), as a pipe would be; absent:
 *            a terminal as usual
 *
 * Order:
 *   1. mount /proc, /sys, /dev; read /wisp/run;
 *   2. mount the image disk read-only, a tmpfs for its writes, and an overlay of
 *      the two at /newroot (the image on the host is never written);
 *   3. /proc, /sys, /dev, /dev/pts, /dev/shm in it; /etc/resolv.conf from the
 *      kernel's DHCP answer (/proc/net/pnp) if there is one;
 *   4. the process: a session leader with the console as controlling tty,
 *      chrooted into /newroot, in its working directory, as its user;
 *   5. PID 1 forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1/2 to it and
 *      reaps every zombie; when it exits, the VM ends with its status through
 *      the debug-exit port (0x500): exit code N, or 128 + signal.
 */

#ifndef NOLIBC
#error "build with -include tools/include/nolibc/nolibc.h"
#endif

#include "console.h"

#define EXIT_PORT 0x500
#define MAX_WORDS 512
#define MAX_GROUPS 64
#define MAX_COPIES 1024
#define RUN_FILE "/wisp/run"

static char run_buf[256 * 1024];
static char *args[MAX_WORDS + 1];
static char *envs[MAX_WORDS + 1];
static const char *disk = "/dev/vda", *cwd = "/", *hostname = "wisp";
static long uid, gid;
static unsigned int groups[MAX_GROUPS];
static int ngroups;
static int raw_tty;
/* bind mounts' directories and files, in order; is_file[i] tells them apart */
static const char *copies[MAX_COPIES];
static char is_file[MAX_COPIES];
static int ncopies;

/* struct termios of the kernel (asm-generic/termbits.h) and the flags cfmakeraw clears */
struct wisp_termios {
	unsigned int iflag, oflag, cflag, lflag;
	unsigned char line, cc[19];
};
#define WISP_TCGETS 0x5401
#define WISP_TCSETS 0x5402

static void say(const char *s)
{
	write(2, s, strlen(s));
}

static void die_status(int status)
{
	unsigned short port = EXIT_PORT;
	unsigned char val = status;

	my_syscall0(__NR_sync);
	if (my_syscall3(__NR_ioperm, EXIT_PORT, 1, 1) == 0)
		__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
	/* no debug-exit port: power off (the status is lost) */
	reboot(LINUX_REBOOT_CMD_POWER_OFF);
	for (;;)
		;
}

static void fail(const char *what, const char *arg)
{
	say("wisp-init: ");
	say(what);
	if (arg) {
		say(" ");
		say(arg);
	}
	say("\n");
	die_status(125);
}

static long number(const char *s)
{
	long n = 0;

	for (; *s >= '0' && *s <= '9'; s++)
		n = n * 10 + (*s - '0');
	return n;
}

static void read_run(void)
{
	int fd = open(RUN_FILE, O_RDONLY, 0), n, len = 0, na = 0, ne = 0;
	char *p, *end, *key, *val;

	if (fd < 0)
		fail("no", RUN_FILE);
	while ((n = read(fd, run_buf + len, sizeof(run_buf) - 1 - len)) > 0)
		len += n;
	close(fd);
	run_buf[len] = 0;
	p = run_buf;
	end = run_buf + len;
	while (p < end) {
		key = p;
		p += strlen(p) + 1;
		if (p >= end)
			break;
		val = p;
		p += strlen(p) + 1;
		if (!strcmp(key, "arg") && na < MAX_WORDS)
			args[na++] = val;
		else if (!strcmp(key, "env") && ne < MAX_WORDS)
			envs[ne++] = val;
		else if (!strcmp(key, "cwd"))
			cwd = val;
		else if (!strcmp(key, "uid"))
			uid = number(val);
		else if (!strcmp(key, "gid"))
			gid = number(val);
		else if (!strcmp(key, "group") && ngroups < MAX_GROUPS)
			groups[ngroups++] = number(val);
		else if (!strcmp(key, "disk"))
			disk = val;
		else if (!strcmp(key, "hostname"))
			hostname = val;
		else if ((!strcmp(key, "dir") || !strcmp(key, "file")) && ncopies < MAX_COPIES) {
			is_file[ncopies] = key[0] == 'f';
			copies[ncopies++] = val;
		} else if (!strcmp(key, "tty"))
			raw_tty = !strcmp(val, "raw");
	}
	if (na == 0)
		fail("no command in", RUN_FILE);
}

static void must_mount(const char *src, const char *dst, const char *type,
		       unsigned long flags, const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, data) != 0)
		fail("cannot mount", dst);
}

/* /proc/net/pnp ("nameserver X" lines, as resolv.conf has them) into the image */
static void resolv_conf(void)
{
	char buf[1024];
	int in = open("/proc/net/pnp", O_RDONLY, 0), out, n;

	if (in < 0)
		return;
	n = read(in, buf, sizeof(buf));
	close(in);
	if (n <= 0)
		return;
	mkdir("/newroot/etc", 0755);
	unlink("/newroot/etc/resolv.conf");
	out = open("/newroot/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (out < 0)
		return;
	write(out, buf, n);
	close(out);
}

/* the value of NAME in envs, or 0 */
static const char *env_of(const char *name)
{
	int i, l = strlen(name);

	for (i = 0; envs[i]; i++)
		if (!strncmp(envs[i], name, l) && envs[i][l] == '=')
			return envs[i] + l + 1;
	return 0;
}

/* execve args[0], searched in PATH (of the process's env) when it has no '/' */
static void exec_command(void)
{
	static char path[4096];
	const char *dirs, *d;
	int l;

	if (strchr(args[0], '/')) {
		execve(args[0], args, envs);
		fail("cannot run", args[0]);
	}
	dirs = env_of("PATH");
	if (!dirs)
		dirs = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
	for (d = dirs; *d; d += l + (d[l] == ':')) {
		l = 0;
		while (d[l] && d[l] != ':')
			l++;
		if (l == 0 || l + 1 + strlen(args[0]) >= sizeof(path))
			continue;
		memcpy(path, d, l);
		path[l] = '/';
		strcpy(path + l + 1, args[0]);
		execve(path, args, envs);
	}
	fail("command not found:", args[0]);
}

/* mkdir -p of the directories above `path` (a path under /newroot) */
static void make_parents(char *path)
{
	char *p;

	for (p = path + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		mkdir(path, 0755);
		*p = '/';
	}
}

/* "/wisp/files/N" into buf (32 bytes) */
static void src_path(char *buf, unsigned int n)
{
	char digits[12];
	int k = sizeof(digits);

	do {
		digits[--k] = '0' + n % 10;
		n /= 10;
	} while (n && k > 0);
	strcpy(buf, "/wisp/files/");
	memcpy(buf + 12, digits + k, sizeof(digits) - k);
	buf[12 + sizeof(digits) - k] = 0;
}

/* the bind mounts' directories and files, into the image's overlay */
static void copy_binds(void)
{
	static char dst[4096], src[32], buf[65536];
	int i, n, nfile = 0, in, out;
	long mode;
	const char *path;

	for (i = 0; i < ncopies; i++) {
		path = copies[i];
		mode = 0755;
		if (is_file[i]) {
			mode = 0;
			for (; *path >= '0' && *path <= '7'; path++)
				mode = mode * 8 + (*path - '0');
			if (*path == ' ')
				path++;
		}
		if (*path != '/' || strlen(path) + 9 >= sizeof(dst))
			fail("bad bind mount path", path);
		strcpy(dst, "/newroot");
		strcpy(dst + 8, path);
		make_parents(dst);
		if (!is_file[i]) {
			mkdir(dst, 0755);
			continue;
		}
		src_path(src, nfile++);
		unlink(dst);
		in = open(src, O_RDONLY, 0);
		out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, mode & 07777);
		if (in < 0 || out < 0)
			fail("cannot copy the bind-mounted file", path);
		while ((n = read(in, buf, sizeof(buf))) > 0)
			if (write(out, buf, n) != n)
				fail("cannot write the bind-mounted file", path);
		close(in);
		close(out);
		chmod(dst, mode & 07777);
	}
}

/* cfmakeraw on stdin's tty: what the process writes reaches the host unchanged */
static void make_raw(void)
{
	struct wisp_termios t;

	if (ioctl(0, WISP_TCGETS, &t) != 0)
		return;
	t.iflag &= ~(01 | 02 | 010 | 040 | 0100 | 0200 | 0400 | 02000);
	t.oflag &= ~01;				/* OPOST */
	t.lflag &= ~(01 | 02 | 010 | 0100 | 0100000); /* ISIG ICANON ECHO ECHONL IEXTEN */
	t.cflag = (t.cflag & ~(060 | 0400)) | 060; /* CS8, no parity */
	t.cc[6] = 1;				/* VMIN */
	t.cc[5] = 0;				/* VTIME */
	ioctl(0, WISP_TCSETS, &t);
}

static pid_t start(const char *tty, unsigned long *mask)
{
	pid_t pid = fork();

	if (pid != 0)
		return pid;
	/* PID 1 blocked these for its signalfd; the process gets them as usual */
	my_syscall4(__NR_rt_sigprocmask, SIG_UNBLOCK, mask, 0, sizeof(*mask));
	take_console(tty);
	if (raw_tty)
		make_raw();
	if (chroot("/newroot") != 0)
		fail("cannot chroot into", "/newroot");
	if (chdir(cwd) != 0)
		fail("no working directory", cwd);
	if (my_syscall2(__NR_setgroups, ngroups, groups) != 0 ||
	    my_syscall1(__NR_setgid, gid) != 0 || my_syscall1(__NR_setuid, uid) != 0)
		fail("cannot become the image's user", 0);
	exec_command();
	return -1;
}

int main(int argc, char **argv, char **envp)
{
	/* struct signalfd_siginfo is 128 bytes; ssi_signo is its first field */
	unsigned int info[32];
	unsigned long mask = 0;
	static const int forward[] = { 1, 2, 3, 10, 12, 15 }; /* HUP INT QUIT USR1 USR2 TERM */
	char tty[48];
	pid_t child, r;
	int sfd, status, i, len;

	(void)argc; (void)argv; (void)envp;

	mount("proc", "/proc", "proc", 0, 0);
	mount("sysfs", "/sys", "sysfs", 0, 0);
	mount("devtmpfs", "/dev", "devtmpfs", 0, 0);
	read_run();

	must_mount(disk, "/lower", "ext4", MS_RDONLY, 0);
	must_mount("tmpfs", "/rw", "tmpfs", 0, "mode=0755");
	mkdir("/rw/upper", 0755);
	mkdir("/rw/work", 0755);
	must_mount("overlay", "/newroot", "overlay", 0,
		   "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work");
	must_mount("proc", "/newroot/proc", "proc", 0, 0);
	must_mount("sysfs", "/newroot/sys", "sysfs", MS_RDONLY, 0);
	must_mount("devtmpfs", "/newroot/dev", "devtmpfs", 0, 0);
	mkdir("/newroot/dev/pts", 0755);
	mount("devpts", "/newroot/dev/pts", "devpts", 0, "gid=5,mode=620,ptmxmode=666");
	mkdir("/newroot/dev/shm", 01777);
	mount("tmpfs", "/newroot/dev/shm", "tmpfs", 0, "mode=1777");
	resolv_conf();
	copy_binds();
	/*
	 * The length first: a function call inside my_syscall2's arguments would
	 * clobber the syscall number already placed in rax (strlen's result is
	 * returned there), and sethostname would become close().
	 */
	len = strlen(hostname);
	my_syscall2(__NR_sethostname, hostname, len);

	/* signals for PID 1 arrive on a signalfd: the ones to forward, and SIGCHLD */
	for (i = 0; i < (int)(sizeof(forward) / sizeof(forward[0])); i++)
		mask |= 1UL << (forward[i] - 1);
	mask |= 1UL << (17 - 1);
	my_syscall4(__NR_rt_sigprocmask, SIG_BLOCK, &mask, 0, sizeof(mask));
	sfd = my_syscall4(__NR_signalfd4, -1, &mask, sizeof(mask), 0);

	console_path(tty, sizeof(tty), "/newroot/dev/");
	child = start(tty, &mask);
	if (child < 0)
		fail("cannot fork", 0);
	for (;;) {
		/* without a signalfd: block in wait4 (nothing is forwarded then) */
		while ((r = wait4(-1, &status, sfd < 0 ? 0 : WNOHANG, 0)) > 0) {
			if (r != child)
				continue;
			kill(-1, SIGKILL);
			if (WIFEXITED(status))
				die_status(WEXITSTATUS(status));
			die_status(128 + (status & 0x7f));
		}
		if (sfd >= 0 && read(sfd, info, sizeof(info)) > 0 && info[0] != 17)
			kill(child, info[0]);
	}
	return 0;
}
