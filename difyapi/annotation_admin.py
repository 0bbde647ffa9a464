"""Django admin of annotation replies: annotations (written through difyapi.annotations, so a question is embedded
and every worker's index refreshed as through the API), each app's reply setting (saving it runs the enable or
disable job at once and reports its outcome), and the read-only jobs and hit history."""
from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import admin, messages

from difyapi import annotations
from difyapi.admin import ReadOnlyAdmin
from difyapi.models import Annotation, AnnotationHit, AnnotationJob, AnnotationSetting
from llmconfigs.models import LLMConfig


class AnnotationForm(forms.ModelForm):
    class Meta:
        model = Annotation
        fields = ["app", "question", "answer"]

    def clean_question(self) -> str:
        question = self.cleaned_data["question"]
        if len(question) > settings.QUERY_MAX_LENGTH:
            raise forms.ValidationError(f"At most {settings.QUERY_MAX_LENGTH} characters (a query's limit).")
        return question

    def clean_answer(self) -> str:
        answer = self.cleaned_data["answer"]
        if len(answer) > annotations.ANSWER_MAX_LENGTH:
            raise forms.ValidationError(f"At most {annotations.ANSWER_MAX_LENGTH} characters.")
        return answer

    def clean(self):
        data = super().clean()
        app = data.get("app")
        if self.instance.pk is None and app is not None and (
                Annotation.objects.filter(app=app).count() >= annotations.ANNOTATIONS_PER_APP):
            raise forms.ValidationError(f"The app has reached its limit of {annotations.ANNOTATIONS_PER_APP} "
                                        "annotations.")
        return data


@admin.register(Annotation)
class AnnotationAdmin(admin.ModelAdmin):
    form = AnnotationForm
    list_display = ["short_question", "app", "hit_count", "embedded", "created_by", "created_at"]
    list_filter = ["app"]
    search_fields = ["question", "answer"]
    readonly_fields = ["hit_count", "embedded", "created_by", "created_at", "updated_at"]

    @admin.display(description="question")
    def short_question(self, obj: Annotation) -> str:
        return obj.question[:80]

    @admin.display(description="embedded", boolean=True)
    def embedded(self, obj: Annotation) -> bool:
        return obj.embedding_config_id is not None

    def get_queryset(self, request):
        return super().get_queryset(request).defer("embedding").select_related("app", "created_by")

    def get_readonly_fields(self, request, obj=None):
        return [*self.readonly_fields, "app"] if obj is not None else self.readonly_fields

    def save_model(self, request, obj: Annotation, form, change: bool) -> None:
        if change:
            annotations.annotation_update(annotation=obj, question=obj.question, answer=obj.answer)
            return
        created = annotations.annotation_create(app=obj.app, question=obj.question, answer=obj.answer,
                                                created_by=request.user)
        for field in Annotation._meta.concrete_fields:
            setattr(obj, field.attname, getattr(created, field.attname))
        obj._state = created._state

    def delete_model(self, request, obj: Annotation) -> None:
        annotations.annotation_delete(annotation=obj)

    def delete_queryset(self, request, queryset) -> None:
        for annotation in queryset.select_related("app"):
            annotations.annotation_delete(annotation=annotation)


class AnnotationSettingForm(forms.ModelForm):
    class Meta:
        model = AnnotationSetting
        fields = ["app", "enabled", "score_threshold", "embedding_config"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "embedding_config" in self.fields:
            self.fields["embedding_config"].queryset = LLMConfig.objects.filter(is_embedding=True, is_active=True)

    def clean(self):
        data = super().clean()
        if data.get("enabled") and not data.get("embedding_config"):
            self.add_error("embedding_config", "Annotation replies need an embedding config.")
        return data


@admin.register(AnnotationSetting)
class AnnotationSettingAdmin(admin.ModelAdmin):
    form = AnnotationSettingForm
    list_display = ["app", "enabled", "score_threshold", "embedding_config", "updated_at"]
    list_filter = ["enabled"]

    def get_readonly_fields(self, request, obj=None):
        return ["app"] if obj is not None else []

    def save_model(self, request, obj: AnnotationSetting, form, change: bool) -> None:
        """The setting changes through the job (which embeds every question first): saved at once, its outcome
        reported on the next page."""
        AnnotationSetting.objects.get_or_create(app=obj.app)
        config = obj.embedding_config
        action = AnnotationJob.Action.ENABLE if obj.enabled else AnnotationJob.Action.DISABLE
        job, running = annotations.annotation_reply_job_start(
            app=obj.app, action=action, score_threshold=obj.score_threshold,
            embedding_provider_name=config.provider if config else "", embedding_model_name=config.model_name if
            config else "", embedding_config=config, background=False,
        )
        if running:
            messages.warning(request, f"An {action} job of this app is still running; nothing was changed.")
        else:
            job = annotations.annotation_reply_job_run(job_id=job.pk)
            if job.status == AnnotationJob.Status.ERROR:
                messages.error(request, job.error_msg)
        obj.refresh_from_db()


@admin.register(AnnotationJob)
class AnnotationJobAdmin(ReadOnlyAdmin):
    list_display = ["app", "action", "status", "error_msg", "created_at", "updated_at"]
    list_filter = ["app", "action", "status"]


@admin.register(AnnotationHit)
class AnnotationHitAdmin(ReadOnlyAdmin):
    list_display = ["question", "annotation", "score", "message", "app", "created_at"]
    list_filter = ["app"]
    search_fields = ["question"]
    list_select_related = ["annotation", "message", "app"]
